"""Where Sluice's workers spend their CPU under load: py-spy on both gunicorn workers during
the 200 streams x 50 tokens/s load (the target scenario), summarized.

    python -m bench.hotspots [--streams 200] [--duration 15] [--write]

py-spy (``.venv/bin/py-spy record --format raw --nonblocking``) samples each
worker over the load window; the raw stacks go to bench/out/pyspy-<pid>.txt
(git-ignored; ``flamegraph.pl`` or speedscope can read them). The summary
attributes every sample (idle time is not sampled) three ways: to the
package of its innermost Python frame (self time), to the stage of a stream
it belongs to (inclusive: the outermost matching frame wins), and the top
functions by self time. The load figures of a profiled run are slightly
worse than the unprofiled row of bench/load.py (sampling costs CPU).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from pathlib import Path

from bench import load
from bench.stack import OUT, Stack, append_results, md_table

__all__ = ["profile_workers", "run", "summarize"]

PY_SPY = Path(sys.executable).parent / "py-spy"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Stages of a stream: a sample goes to the first stage (in this order) one of whose needles
# is in its stack. py-spy shows a resumed generator's frames without their callers, hence
# the extra needles for the upstream read.
STAGES = [
    ("closing the upstream response (SDK, httpx2 pool release)", ("Generation._close_upstream",)),
    ("generation end (done event, final Redis pipeline, metrics, log)", ("Generation._finish",)),
    (
        "token events: coalesce, SSE encode, wake followers",
        ("Generation._emit_pending", "Generation._add_text"),
    ),
    ("opening the upstream request (openai SDK, connect)", ("Upstream.open",)),
    (
        "request handling before the stream starts (HTTP parse, Flask, limiter, slots, registry)",
        ("full_dispatch_request", "Parser.__next__", "Request.__init__ (gunicorn"),
    ),
    (
        "reading + parsing upstream chunks (httpx2/httpcore2/h11 reads, _parse)",
        (
            "iter_text (streaming/upstream/client.py",
            "_receive_response_body",
            "HTTP11ConnectionByteStream",
            "Generation.run",
        ),
    ),
    (
        "writing SSE frames to clients (follower, werkzeug, gunicorn chunked write)",
        ("Body.__next__", "frames (streaming/core/follow.py", "write_chunk", "handle_request"),
    ),
    ("event-log flusher (XADD batches to Redis)", ("EventLog.flush",)),
    ("registry tick / cancel listener", ("StreamManager._tick", "StreamManager._listen")),
    ("client socket watch", ("ClientWatch._watch",)),
    ("gevent thread pool (DNS resolution of the upstream host)", ("_WorkerGreenlet.run",)),
    ("gevent hub / event loop (switching, timers, I/O callbacks)", ("Hub.run",)),
]


# Inclusive shares of a few costs that every relayed token pays (any frame matching).
COSTS = [
    ("gevent socket send (client writes, upstream request) incl. syscall", "SocketMixin.send"),
    ("gevent socket recv (upstream reads, Redis replies) incl. syscall", "SocketMixin.recv"),
    ("upstream HTTP client per read: httpx2/httpcore2/h11", "HTTP11Connection._receive_event"),
    ("gevent Timeout objects (a socket timeout armed on every wait)", "gevent/timeout.py"),
    ("contextlib context managers (httpcore2 map_exceptions, ...)", "contextlib.py"),
    ("JSON decode (upstream chunks)", "json/decoder.py"),
    ("JSON encode (SSE events)", "json/encoder.py"),
    ("redis-py (every Redis call: start, flusher, end)", "redis/"),
    ("rate limits (flask-limiter)", "flask_limiter/"),
    ("openai SDK (request building, response wrapping)", "openai/"),
    ("gunicorn response writing (chunked framing)", "gunicorn/http/wsgi.py"),
    ("logging (JSON lines)", "logging/"),
    ("prometheus_client", "prometheus_client/"),
]


def parse_frame(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame, ""
    return m["func"], m["file"] or ""


def package_of(path: str) -> str:
    """Top-level package of a frame's file (py-spy prints paths relative to sys.path)."""
    path = path.split("site-packages/", 1)[-1]
    if "/lib/python3" in path:
        path = path.split("/lib/python3", 1)[1].split("/", 1)[-1]
    top = path.lstrip("/").split("/", 1)[0].removesuffix(".py") or "?"
    return "streaming (Sluice)" if top == "streaming" else top


def summarize(raw_files: list[Path], top: int = 15) -> dict:
    by_package: collections.Counter = collections.Counter()
    by_function: collections.Counter = collections.Counter()
    by_stage: collections.Counter = collections.Counter()
    by_cost: collections.Counter = collections.Counter()
    total = 0
    for path in raw_files:
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames:
                continue
            func, file = parse_frame(frames[-1])
            by_package[package_of(file)] += n
            by_function[f"{func} ({file.split('site-packages/')[-1]})"] += n
            stage = "other"
            for name, needles in STAGES:
                if any(needle in frame for frame in frames for needle in needles):
                    stage = name
                    break
            by_stage[stage] += n
            for name, needle in COSTS:
                if any(needle in frame for frame in frames):
                    by_cost[name] += n
    return {
        "samples": total,
        "stages": by_stage.most_common(),
        "costs": by_cost.most_common(),
        "packages": by_package.most_common(top),
        "functions": by_function.most_common(top),
    }


def profile_workers(pids: list[int], seconds: float, rate: int = 100) -> list[Path]:
    OUT.mkdir(exist_ok=True)
    files, procs = [], []
    for pid in pids:
        out = OUT / f"pyspy-{pid}.txt"
        files.append(out)
        cmd = [str(PY_SPY), "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
        cmd += ["--duration", str(int(seconds)), "--rate", str(rate), "--nonblocking"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for proc in procs:
        try:
            proc.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return [f for f in files if f.exists()]


def run(streams: int = load.TARGET_N, duration: float = 15.0, warmup: float = 5.0) -> dict:
    files: list[Path] = []
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", str(load.RATE), "--delay", "0")
        server = stack.sluice(redis_server, sim)
        workers = server.worker_pids()
        groups = {
            "simulator": [sim.proc.pid],
            "redis": [redis_server.proc.pid],
            "server": workers,
        }

        def profile(seconds: float) -> None:
            started = time.time()
            files.extend(profile_workers(workers, seconds - 1))
            time.sleep(max(0.0, seconds - (time.time() - started)))

        result = load.run_load(
            "sluice", server.base, streams, warmup, duration, groups, None, profile
        )
    summary = summarize(files)
    total = summary["samples"] or 1
    stages = md_table(
        ["stage of a stream (inclusive)", "share of sampled worker CPU"],
        [[name, f"{n / total:.0%}"] for name, n in summary["stages"]],
    )
    costs = md_table(
        ["cost (inclusive: samples with a matching frame; they overlap)", "share"],
        [[name, f"{n / total:.0%}"] for name, n in summary["costs"]],
    )
    packages = md_table(
        ["innermost package (self)", "share"],
        [[name, f"{n / total:.0%}"] for name, n in summary["packages"]],
    )
    functions = md_table(
        ["function (self time)", "share"],
        [[f"`{name}`", f"{n / total:.1%}"] for name, n in summary["functions"]],
    )
    markdown = (
        f"### Hot spots: py-spy on both workers, Sluice at {streams} × {load.RATE} "
        f"({summary['samples']} samples over {duration:.0f} s; profiled run: delivered "
        f"{result['delivered_tps']:.0f} tok/s, TTFT p50 {result['ttft_p50_ms']:.0f} ms "
        f"(response head p50 {result['head_p50_ms']:.0f} ms, Sluice's own ttft_ms p50 "
        f"{result['server_ttft_p50_ms']:.0f} ms), "
        f"workers {result['cpu_cores']['server']:.2f} cores)\n\n"
        f"{stages}\n{costs}\n{packages}\n{functions}"
    )
    return {
        "markdown": markdown,
        "summary": summary,
        "load": result,
        "files": [str(f) for f in files],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=load.TARGET_N)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--write", action="store_true", help="append to bench/HISTORY.md")
    args = parser.parse_args()
    result = run(args.streams, args.duration)
    print(result["markdown"])
    if args.write:
        append_results("hotspots", result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
