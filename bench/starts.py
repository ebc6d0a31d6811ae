"""Stream starts: what a start costs the workers, one stream alone, and a burst of starts.

Three steps of the suite, each beside a baseline measured in the same run:

- ``startcpu``: worker CPU per stream start. ``STARTS`` tiny streams
  (``sim:tokens=1 sim:rate=0 sim:delay=0``, `CONCURRENCY` at a time, raw-socket
  clients in threads) through Sluice; the workers' user + system CPU (from
  /proc) over the run, minus their idle CPU over as long a wall time (the
  registry tick, the flusher), divided by the starts. So a "start" is the whole
  life of a one-token stream: HTTP parse, Flask, limits, admission, the SDK
  request, one token, the final pipeline, the log line. Median of `ROUNDS`
  rounds. Baselines: a bare Flask route (``GET /health``, which has the same
  gunicorn, Flask and request log but no limiter, Redis or upstream) hit the
  same way on the same workers, and the common design's stream start.
  Target: ≤ 1 ms of worker CPU per start.
- ``single``: one stream alone: connect -> first token frame, Sluice and direct
  to the simulator alternately, `SINGLE_TRIES` each after a warm-up; added
  TTFT = median(Sluice) - median(direct). Target ≤ 2 ms.
- ``burst``: `BURST_N` streams started at the same instant (100 tokens at 50
  tokens/s each, no upstream delay), direct to the simulator and through Sluice
  alternately, `BURST_ROUNDS` bursts each (bench/loadgen.py ``--burst``, one
  process). Delivered tokens/s = all tokens / (last stream end - burst start);
  figures are medians over the bursts. Targets: delivered ≥ 0.9 × direct,
  TTFT p50 ≤ direct + 60 ms. (The ``load`` step's streams start at a steady
  pace, spread over one stream length; this one is the simultaneous burst.)

    python -m bench.starts [startcpu,single,burst] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

from bench import loadgen
from bench.client import Conn, _request, direct_request, post_request
from bench.stack import OUT, ROOT, Stack, cpu_seconds, md_table, pct, wait_sim_idle

__all__ = ["run_burst", "run_single", "run_startcpu"]

STARTS, QUICK_STARTS = 400, 150
CONCURRENCY = 8
ROUNDS = 3
IDLE_SECONDS = 2.0
TINY = "sim:tokens=1 sim:rate=0 sim:delay=0"
TARGET_START_MS = 1.0

SINGLE_TRIES = 15
SINGLE = "sim:tokens=5 sim:rate=50 sim:delay=0"
TARGET_SINGLE_MS = 2.0

BURST_N = 200
BURST_TOKENS = 100
BURST_RATE = 50
BURST_ROUNDS, QUICK_BURST_ROUNDS = 5, 2
TARGET_BURST_RATIO = 0.9
TARGET_BURST_TTFT_MS = 60.0

_DONE = {"sluice": b"event: done", "common": b'"type": "done"', "health": b""}


def _one(kind: str, port: int, tag: str) -> None:
    deadline = time.time() + 30
    conn = Conn(port)
    try:
        if kind == "health":
            conn.send(_request("GET", "/health", port))
            status = conn.read_head(deadline)
            conn.read_body(deadline)
        else:
            conn.send(post_request(port, f"start {tag} {TINY}"))
            status = conn.read_head(deadline)
            if status == 200:
                conn.read_until(_DONE[kind], deadline)
        if status != 200:
            raise RuntimeError(f"{kind}: HTTP {status}")
    finally:
        conn.close()


def _hammer(kind: str, port: int, n: int, round_no: int) -> list[str]:
    """`n` requests, CONCURRENCY at a time; returns the errors."""
    errors: list[str] = []
    counter = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            try:
                _one(kind, port, f"{round_no}-{i}")
            except Exception as exc:  # counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def cpu_per_request(kind: str, port: int, pids: list[int], n: int, rounds: int) -> dict:
    """Worker CPU per request (ms) over `rounds` rounds of `n`, idle CPU subtracted."""
    _hammer(kind, port, 20, -1)  # warm-up: pooled connections, imports, caches
    per, errors, idle_rates = [], [], []
    for r in range(rounds):
        c0, t0 = cpu_seconds(pids), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle = (cpu_seconds(pids) - c0) / (time.monotonic() - t0)
        idle_rates.append(idle)
        c0, t0 = cpu_seconds(pids), time.monotonic()
        errors += _hammer(kind, port, n, r)
        cpu, wall = cpu_seconds(pids) - c0, time.monotonic() - t0
        per.append((cpu - idle * wall) / n * 1000)
    return {
        "ms": statistics.median(per),
        "rounds_ms": per,
        "idle_cores": statistics.median(idle_rates),
        "n": n,
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:5],
    }


def run_startcpu(quick: bool = False, kinds=("sluice", "health", "common")) -> dict:
    n = QUICK_STARTS if quick else STARTS
    rounds = 2 if quick else ROUNDS
    data: dict[str, dict] = {}
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", "0", "--delay", "0")
        server = stack.sluice(redis_server, sim)
        pids = server.worker_pids()
        for kind in ("sluice", "health"):
            if kind in kinds:
                data[kind] = cpu_per_request(kind, server.port, pids, n, rounds)
                print(f"bench.starts: startcpu {kind}: {json.dumps(data[kind])}", file=sys.stderr)
        stack.release(server)
        if "common" in kinds:
            common = stack.common(sim)
            data["common"] = cpu_per_request("common", common.port, common.worker_pids(), n, rounds)
            print(f"bench.starts: startcpu common: {json.dumps(data['common'])}", file=sys.stderr)
    labels = {
        "sluice": "Sluice stream start (1-token stream, whole life)",
        "health": "bare Flask route, same workers (`GET /health`)",
        "common": "common design stream start (1-token stream)",
    }
    rows = [
        [
            labels[k],
            d["n"],
            f"{d['ms']:.2f}",
            " / ".join(f"{x:.2f}" for x in d["rounds_ms"]),
            f"{d['idle_cores'] * 1000:.1f}",
            d["errors"],
        ]
        for k, d in data.items()
    ]
    table = md_table(
        [
            "what",
            "requests per round",
            "worker CPU ms per request (median)",
            "rounds",
            "idle worker CPU ms/s (subtracted)",
            "errors",
        ],
        rows,
    )
    markdown = (
        f"### Stream-start CPU (2 gevent workers, {CONCURRENCY} clients at a time, `{TINY}`; "
        f"target ≤ {TARGET_START_MS:g} ms per start)\n\n{table}"
    )
    return {"markdown": markdown, "data": data}


# -- one stream alone ----------------------------------------------------------------------


def _ttft(kind: str, port: int, tag: str) -> float:
    """connect -> the receive holding the first token frame, in ms; reads the stream to its end."""
    deadline = time.time() + 30
    t0 = time.time()
    conn = Conn(port)
    try:
        prompt = f"single {tag} {SINGLE}"
        if kind == "direct":
            conn.send(direct_request(port, prompt))
            token, end = b'"delta":{"content":', b"data: [DONE]"
        else:
            conn.send(post_request(port, prompt))
            token, end = b"event: token", b"event: done"
        status = conn.read_head(deadline)
        if status != 200:
            raise RuntimeError(f"{kind}: HTTP {status}")
        first = conn.read_until(token, deadline)
        conn.read_until(end, deadline)
    finally:
        conn.close()
    return (first - t0) * 1000


def run_single(quick: bool = False) -> dict:
    tries = 7 if quick else SINGLE_TRIES
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", "50", "--delay", "0")
        server = stack.sluice(redis_server, sim)
        sim_port = int(sim.base.rsplit(":", 1)[1])
        ports = {"direct": sim_port, "sluice": server.port}
        for i in range(3):  # warm-up
            for kind, port in ports.items():
                _ttft(kind, port, f"w{i}")
        ms: dict[str, list[float]] = {"direct": [], "sluice": []}
        for i in range(tries):
            for kind, port in ports.items():
                ms[kind].append(_ttft(kind, port, str(i)))
                time.sleep(0.05)
    direct, sluice_ = statistics.median(ms["direct"]), statistics.median(ms["sluice"])
    added = sluice_ - direct
    rows = [
        [
            "direct (baseline)",
            tries,
            f"{direct:.2f}",
            f"{pct(ms['direct'], 10):.2f} – {pct(ms['direct'], 90):.2f}",
            "",
        ],
        [
            "Sluice",
            tries,
            f"{sluice_:.2f}",
            f"{pct(ms['sluice'], 10):.2f} – {pct(ms['sluice'], 90):.2f}",
            f"{added:+.2f} ms (target ≤ +{TARGET_SINGLE_MS:g}: "
            f"{'met' if added <= TARGET_SINGLE_MS else 'MISSED'})",
        ],
    ]
    table = md_table(
        ["target", "tries", "TTFT median ms", "p10 – p90 ms", "added over direct"], rows
    )
    markdown = (
        "### One stream alone (connect → first token frame; Sluice and direct alternately, "
        f"`{SINGLE}`)\n\n{table}"
    )
    return {
        "markdown": markdown,
        "data": {
            "direct_ms": direct,
            "sluice_ms": sluice_,
            "added_ms": added,
            "tries": tries,
            "raw": ms,
        },
    }


# -- a burst of starts ----------------------------------------------------------------------


def _burst(kind: str, url: str, groups: dict[str, list[int]]) -> dict:
    start_at = time.time() + 1.0
    cmd = [sys.executable, "-m", "bench.loadgen", "--burst", "--kind", kind, "--url", url]
    cmd += ["--streams", str(BURST_N), "--rate", str(BURST_RATE)]
    cmd += ["--tokens", f"{BURST_TOKENS}-{BURST_TOKENS}", "--start-at", f"{start_at:.3f}"]
    child = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    cpu0 = {name: cpu_seconds(pids) for name, pids in groups.items()}
    out, _ = child.communicate(timeout=loadgen.STREAM_TIMEOUT + 30)
    cpu1 = {name: cpu_seconds(pids) for name, pids in groups.items()}
    raw = json.loads(out)
    summary = loadgen.summarize(raw)
    summary["window_s"] = raw["window_s"]
    summary["cpu_s"] = {name: cpu1[name] - cpu0[name] for name in groups}
    return summary


def run_burst(quick: bool = False) -> dict:
    rounds = QUICK_BURST_ROUNDS if quick else BURST_ROUNDS
    runs: dict[str, list[dict]] = {"direct": [], "sluice": []}
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", str(BURST_RATE), "--delay", "0")
        server = stack.sluice(redis_server, sim)
        base = {"simulator": [sim.proc.pid], "redis": [redis_server.proc.pid]}
        for _ in range(rounds):
            for kind in ("direct", "sluice"):
                if kind == "sluice":
                    url, groups = server.base, {**base, "server": server.worker_pids()}
                else:
                    url, groups = sim.base, base
                r = _burst(kind, url, groups)
                runs[kind].append(r)
                brief = {k: r[k] for k in ("delivered_tps", "ttft_p50_ms", "ttft_p99_ms")}
                print(f"bench.starts: burst {kind}: {json.dumps(brief)}", file=sys.stderr)
                wait_sim_idle(sim, 30)
    med = {
        kind: {
            key: statistics.median(r[key] for r in rs)
            for key in ("delivered_tps", "ttft_p50_ms", "ttft_p99_ms", "head_p50_ms", "window_s")
        }
        | {
            "errors": sum(r["errors"] for r in rs),
            "completed": sum(r["completed"] for r in rs),
            "server_cpu_s": statistics.median(r["cpu_s"].get("server", 0.0) for r in rs),
        }
        for kind, rs in runs.items()
    }
    d, s = med["direct"], med["sluice"]
    ratio = s["delivered_tps"] / d["delivered_tps"]
    extra = s["ttft_p50_ms"] - d["ttft_p50_ms"]
    rows = []
    for kind, label in (("direct", "direct (baseline)"), ("sluice", "Sluice")):
        m = med[kind]
        rows.append(
            [
                label,
                f"{m['delivered_tps']:.0f}",
                "1.00" if kind == "direct" else f"{ratio:.2f}",
                f"{m['ttft_p50_ms']:.1f}",
                f"{m['ttft_p99_ms']:.1f}",
                f"{m['window_s']:.2f}",
                f"{m['completed']}/{BURST_N * rounds}",
                m["errors"],
                f"{m['server_cpu_s'] * 1000 / BURST_N:.2f}" if kind == "sluice" else "–",
            ]
        )
    table = md_table(
        [
            "target",
            "delivered tok/s",
            "vs direct",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "burst length s",
            "streams completed",
            "errors",
            "worker CPU ms per stream",
        ],
        rows,
    )
    lines = (
        f"- Sluice: delivered {ratio:.2f} × direct (target ≥ {TARGET_BURST_RATIO}: "
        f"{'met' if ratio >= TARGET_BURST_RATIO else 'MISSED'}); TTFT p50 = direct "
        f"{extra:+.1f} ms (target ≤ +{TARGET_BURST_TTFT_MS:g} ms: "
        f"{'met' if extra <= TARGET_BURST_TTFT_MS else 'MISSED'})\n"
    )
    markdown = (
        f"### Burst: {BURST_N} streams started at once ({BURST_TOKENS} tokens at {BURST_RATE} "
        f"tokens/s each; median of {rounds} bursts per target, alternating; 2 gevent workers)\n\n"
        f"{table}\n{lines}"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "burst.json").write_text(json.dumps(runs, indent=1))
    return {
        "markdown": markdown,
        "data": {"median": med, "ratio": ratio, "ttft_extra_ms": extra, "rounds": rounds},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="?", default="startcpu,single,burst")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--kinds", default="sluice,health,common", help="startcpu: what to run")
    args = parser.parse_args()
    for step in args.steps.split(","):
        if step == "startcpu":
            result = run_startcpu(args.quick, tuple(args.kinds.split(",")))
        elif step == "single":
            result = run_single(args.quick)
        elif step == "burst":
            result = run_burst(args.quick)
        else:
            parser.error(f"unknown step {step}")
        print(result["markdown"], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
