"""Memory per open idle stream: RSS of the gunicorn workers (sum, from /proc) with 1,000 and
5,000 streams waiting for a slow first token (``sim:delay=120``), against the RSS at 0 streams
measured in the same run (after a warm-up, so that every code path is already loaded).

Sluice: 2 gevent workers, ``WORKER_CONNECTIONS=6000``, ``UPSTREAM_TIMEOUT_SECONDS=600`` (so
that the 120 s of upstream silence is not an error), ``DISCONNECT_GRACE_SECONDS=0``. A holder
process (gevent, raw sockets) opens the streams, at most 100 opening at once, reads each one's
``start`` event and keeps it open; once the simulator reports every upstream request open, the
RSS is sampled. Each stream holds a client connection, its greenlets, the generation and an
upstream connection. Target: <= 40 KB per stream (was 64), no error at 5,000 streams.

    python -m bench.memory [--quick] [--levels 1000,5000] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import threading
import time

from bench.stack import (
    OUT,
    ROOT,
    Stack,
    append_results,
    md_table,
    rss_bytes,
    sim_stats,
    wait_for,
    wait_sim_idle,
)

__all__ = ["run"]

LEVELS, QUICK_LEVELS = (1000, 5000), (200, 1000)
TARGET_KB = 40  # issue 14 (was 64)
DELAY = 120  # seconds before the first token: every measurement must end before that
OPENING = 100  # streams opening at once


def holder_main(port: int) -> int:
    """The holder process: commands on stdin (``open K``, ``close``), one JSON line per reply."""
    import gevent
    from gevent import socket
    from gevent.fileobject import FileObjectPosix
    from gevent.lock import BoundedSemaphore

    from bench.client import post_request

    state = {"ready": 0, "errors": {}, "token_events": 0, "ended": 0}
    opening = BoundedSemaphore(OPENING)
    greenlets: list = []

    def error(what: str) -> None:
        state["errors"][what] = state["errors"].get(what, 0) + 1

    def hold(index: int, settled: list) -> None:
        sock = None
        try:
            with opening:
                sock = socket.create_connection(("127.0.0.1", port), timeout=60)
                sock.sendall(post_request(port, f"idle {index} sim:delay={DELAY} sim:tokens=5"))
                buf = b""
                while b"event: start" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        raise EOFError
                    buf += data
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise OSError(f"HTTP {buf[9:12].decode(errors='replace')}")
            state["ready"] += 1
            settled.append(index)
            sock.settimeout(None)
            while data := sock.recv(65536):
                state["token_events"] += data.count(b"event: token")
            state["ended"] += 1
        except gevent.GreenletExit:
            raise
        except Exception as exc:
            error(type(exc).__name__ if not str(exc).startswith("HTTP") else str(exc))
            settled.append(index)
        finally:
            if sock is not None:
                sock.close()

    stdin = FileObjectPosix(sys.stdin.fileno(), "rb")
    opened = 0
    while line := stdin.readline():
        command = line.decode().split()
        if command[0] == "open":
            settled: list = []
            count = int(command[1])
            started = time.time()
            greenlets += [gevent.spawn(hold, opened + i, settled) for i in range(count)]
            opened += count
            while len(settled) < count and time.time() - started < 90:
                gevent.sleep(0.05)
            state["open_seconds"] = round(time.time() - started, 1)
        elif command[0] == "close":
            gevent.killall(greenlets, timeout=10)
        print(json.dumps(state), flush=True)
        if command[0] == "close":
            break
    return 0


class Holder:
    def __init__(self, port: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.memory", "--holder", str(port)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def command(self, line: str, timeout: float = 120) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"holder did not answer {line!r}")
        return json.loads(self.proc.stdout.readline())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.command("close", 30)
            except (OSError, TimeoutError, ValueError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _rss(pids: list[int], samples: int = 3) -> int:
    values = []
    for i in range(samples):
        if i:
            time.sleep(0.5)
        values.append(rss_bytes(pids))
    return int(statistics.median(values))


def _warm_up(port: int) -> None:
    from bench.relay_cpu import run_stream

    results: list = [None] * 40
    threads = [
        threading.Thread(target=run_stream, args=("sluice", port, 20, 0, results, i))
        for i in range(40)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _log_problems(path) -> int:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return -1
    return sum(
        1
        for line in text.splitlines()
        if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
    )


def run(quick: bool = False, levels: tuple[int, ...] | None = None) -> dict:
    levels = levels or (QUICK_LEVELS if quick else LEVELS)
    rows, data = [], {"levels": {}}
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", "50", "--delay", "0")
        server = stack.sluice(
            redis_server, sim, UPSTREAM_TIMEOUT_SECONDS="600", DISCONNECT_GRACE_SECONDS="0"
        )
        workers = server.worker_pids()
        _warm_up(server.port)
        wait_sim_idle(sim, 10)
        time.sleep(1)
        base = _rss(workers)
        data["base_rss"] = base
        rows.append(["0 (baseline)", f"{base / 2**20:.1f}", "–", "–", "–", "–", "–", "", ""])
        holder = Holder(server.port)
        try:
            first = time.time()
            held = 0
            for level in levels:
                reply = holder.command(f"open {level - held}")
                held = level
                try:
                    wait_for(
                        lambda level=level: sim_stats(sim)["open_streams"] >= level,
                        60,
                        f"{level} upstream requests open",
                    )
                    all_open = True
                except AssertionError:
                    all_open = False
                time.sleep(2)
                rss = _rss(workers)
                per = (rss - base) / level
                elapsed = time.time() - first
                errors = sum(reply["errors"].values()) + (0 if all_open else 1)
                problems = _log_problems(server.log_path)
                per_worker = " / ".join(f"{rss_bytes([p]) / 2**20:.0f}" for p in workers)
                data["levels"][level] = {
                    "rss": rss,
                    "per_stream_kb": per / 1024,
                    "holder": reply,
                    "all_upstreams_open": all_open,
                    "elapsed_s": elapsed,
                    "log_problems": problems,
                    "sim_rss": rss_bytes([sim.proc.pid]),
                    "redis_rss": rss_bytes([redis_server.proc.pid]),
                    "holder_rss": rss_bytes([holder.proc.pid]),
                }
                still_idle = reply["token_events"] == 0 and elapsed < DELAY
                ok = per / 1024 <= TARGET_KB
                rows.append(
                    [
                        level,
                        f"{rss / 2**20:.1f} ({per_worker})",
                        f"{per / 1024:.1f}",
                        f"{reply['ready']}/{level}",
                        f"{errors} (log: {problems})",
                        f"{data['levels'][level]['sim_rss'] / 2**20:.0f}",
                        f"{data['levels'][level]['redis_rss'] / 2**20:.0f}",
                        "yes" if still_idle else "NO (a first token arrived)",
                        ("met" if ok else "MISSED") + ("" if errors == 0 else "; errors: MISSED"),
                    ]
                )
        finally:
            final = None
            try:
                final = holder.command("close", 30)
            except (OSError, TimeoutError, ValueError):
                pass
            holder.stop()
        wait_sim_idle(sim, 30)
        time.sleep(1)
        after = _rss(workers)
        data["after_close_rss"] = after
        data["holder_final"] = final
    table = md_table(
        [
            "open idle streams",
            "workers' RSS MiB (per worker)",
            "KB per stream over baseline",
            "streams started",
            "errors",
            "simulator RSS MiB",
            "Redis RSS MiB",
            "all still waiting for the first token",
            f"target ≤ {TARGET_KB} KB",
        ],
        rows,
    )
    markdown = (
        "### Memory per idle stream (2 gevent workers, streams waiting on "
        f"sim:delay={DELAY})\n\n{table}\nAfter closing them all: workers' RSS "
        f"{after / 2**20:.1f} MiB (the allocator keeps freed pages).\n"
    )
    return {"markdown": markdown, "data": data}


PROBE_LEVEL = 500
# Which part of a stream an allocation belongs to: the first needle (file path or function
# name, resolved from the source) found in its traceback, in this order.
PARTS = [
    (
        "upstream request + response (openai SDK, httpx2, httpcore2, h11), reader greenlet stack",
        ("Generation.run", "httpx2/", "httpcore2/", "h11/", "openai/", "pydantic/"),
    ),
    ("client-socket watch (greenlet stack before; now a libev watcher)", ("ClientWatch",)),
    (
        "SSE response: follower + WSGI handler greenlet stack",
        ("follow_local", "LocalFollower", "Wake.wait"),
    ),
    (
        "request parsing and stream start (gunicorn, Flask, limiter, registry)",
        ("StreamManager.start", "streaming/web/limits.py", "gunicorn/", "werkzeug/", "flask/"),
    ),
    ("the Generation object (events, text)", ("streaming/core/generation.py",)),
    ("gevent internals (hub, watchers)", ("gevent/",)),
]
_FUNCS: dict[str, list[tuple[int, int, str]]] = {}


def _qualname(filename: str, lineno: int) -> str:
    """The function (Class.method, outer.inner) holding a line, from the source file."""
    import ast

    if filename not in _FUNCS:
        spans: list[tuple[int, int, str]] = []

        def walk(node, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        spans.append((child.lineno, child.end_lineno or child.lineno, name))
                    walk(child, name + ".")
                else:
                    walk(child, prefix)

        try:
            walk(ast.parse(open(filename).read()), "")  # noqa: SIM115
        except (OSError, SyntaxError, ValueError):
            pass
        _FUNCS[filename] = spans
    inside = [s for s in _FUNCS[filename] if s[0] <= lineno <= s[1]]
    return max(inside, key=lambda s: s[0])[2] if inside else ""


def _signal_probe(pids: list[int], expect: list) -> list:
    import signal

    for pid in pids:
        os.kill(pid, signal.SIGRTMIN + 3)
    wait_for(lambda: all(p.exists() for p in expect), 120, "memory probe")
    return expect


def probe(level: int = PROBE_LEVEL, top: int = 12) -> dict:
    """Where the memory of idle streams goes: tracemalloc in the workers (started by
    bench/memprobe/sitecustomize.py after the warm-up), one snapshot at `level` streams."""
    import shutil
    import tracemalloc

    where = OUT / "memprobe"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    env = {"PYTHONPATH": str(ROOT / "bench" / "memprobe"), "BENCH_MEMPROBE": str(where)}
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", "50", "--delay", "0")
        server = stack.sluice(
            redis_server,
            sim,
            UPSTREAM_TIMEOUT_SECONDS="600",
            DISCONNECT_GRACE_SECONDS="0",
            **env,
        )
        workers = server.worker_pids()
        _warm_up(server.port)
        wait_sim_idle(sim, 10)
        time.sleep(1)
        rss0 = _rss(workers)
        _signal_probe(workers, [where / f"tracing-{pid}" for pid in workers])
        holder = Holder(server.port)
        try:
            reply = holder.command(f"open {level}")
            wait_for(lambda: sim_stats(sim)["open_streams"] >= level, 60, "upstreams open")
            time.sleep(2)
            rss1 = _rss(workers)
            snaps = _signal_probe(workers, [where / f"tracemalloc-{pid}-1.snap" for pid in workers])
        finally:
            holder.stop()
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "*/bench/memprobe/*"),
    ]
    by_line: dict[str, int] = {}
    by_part: dict[str, int] = {}
    total = 0
    for path in snaps:
        snapshot = tracemalloc.Snapshot.load(str(path)).filter_traces(ignore)
        for stat in snapshot.statistics("traceback"):
            total += stat.size
            frames = [
                f"{f.filename}:{f.lineno} {_qualname(f.filename, f.lineno)}" for f in stat.traceback
            ]
            part = "other"
            for name, needles in PARTS:
                if any(n in frame for frame in frames for n in needles):
                    part = name
                    break
            by_part[part] = by_part.get(part, 0) + stat.size
            # tracemalloc keeps the most recent frame last
            line = _short(frames[-1]) if frames else "?"
            by_line[line] = by_line.get(line, 0) + stat.size
    per = level or 1
    parts = sorted(by_part.items(), key=lambda kv: -kv[1])
    lines = sorted(by_line.items(), key=lambda kv: -kv[1])[:top]
    table_parts = md_table(
        ["part of a stream (tracemalloc, by traceback)", "bytes per stream"],
        [[name, f"{size / per:,.0f}"] for name, size in parts],
    )
    table_lines = md_table(
        ["allocating line (innermost frame)", "bytes per stream"],
        [[f"`{name}`", f"{size / per:,.0f}"] for name, size in lines],
    )
    markdown = (
        f"#### Where it goes: tracemalloc in both workers, {level} idle streams\n\n"
        f"Python-traced memory allocated since the baseline and alive: "
        f"{total / per / 1024:.1f} KB per stream; RSS growth in this (traced) run: "
        f"{(rss1 - rss0) / per / 1024:.1f} KB per stream (tracemalloc's own bookkeeping "
        f"included); holder: {reply['ready']}/{level} started.\n\n{table_parts}\n{table_lines}"
    )
    return {
        "markdown": markdown,
        "traced_per_stream": total / per,
        "rss_per_stream": (rss1 - rss0) / per,
        "parts": parts,
        "lines": lines,
    }


def _short(frame: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in frame:
            return frame.split(marker, 1)[1]
    return frame


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--holder":
        return holder_main(int(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--levels", help="comma list, e.g. 1000,5000")
    parser.add_argument("--probe", action="store_true", help="also run the tracemalloc probe")
    parser.add_argument("--write", action="store_true", help="append to bench/HISTORY.md")
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(",")) if args.levels else None
    result = run(args.quick, levels)
    if args.probe:
        result["markdown"] += "\n" + probe()["markdown"]
    print(result["markdown"])
    if args.write:
        append_results("memory", result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
