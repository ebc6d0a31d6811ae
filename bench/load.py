"""Load: N concurrent streams x R tokens/s through Sluice, against the same clients talking
straight to the simulator (the baseline), measured in the same run.

One redis-server, one simulator, Sluice on gunicorn with 2 gevent workers
(``WORKER_CONNECTIONS=6000``, limits out of the way, ``HEARTBEAT_SECONDS=15``).
For each N (50, 100, 200, 500, 1000; ``--quick``: 50, 200) the load generator
(bench/loadgen.py, gevent + raw sockets, in its own processes: one below 500
streams, two from 500 on) runs first against the simulator's
``/v1/chat/completions`` and then against Sluice. Streams ask for 100-200
tokens at R = 50 tokens/s with no upstream delay, so TTFT is the relay's own
overhead. Reported: delivered tokens/s, TTFT p50/p99, inter-token gap
p50/p99, errors, and the CPU (cores, from /proc) used during the window by
Sluice's workers, the simulator, Redis and the generator itself. The common
design (bench/common_design.py) and Sluice with ``RELAY_INTERVAL_MS=0`` (every
upstream read relayed at once, no batching) and ``=50`` get a 200-stream row each.

Targets (2 workers, 200 x 50): delivered >= 0.9 x direct, TTFT p50 <= direct + 20 ms.

    python -m bench.load [--quick] [--streams 50,200] [--duration S] [--write]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time

from bench import loadgen
from bench.stack import (
    OUT,
    ROOT,
    Stack,
    append_results,
    cpu_seconds,
    md_table,
    sim_stats,
    wait_sim_idle,
)

__all__ = ["TARGET_N", "run", "run_load"]

RATE = 50
TOKENS = "100-200"
LEVELS, QUICK_LEVELS = (50, 100, 200, 500, 1000), (50, 200)
TARGET_N = 200
DESIGNS = {
    "direct": "direct (baseline)",
    "sluice": "Sluice",
    "sluice0": "Sluice, RELAY_INTERVAL_MS=0",
    "sluice50": "Sluice, RELAY_INTERVAL_MS=50",
    "common": "common design",
}
VARIANTS = {"sluice0": "0", "sluice50": "50"}  # RELAY_INTERVAL_MS of the 200-stream variants


def run_load(
    kind: str,
    url: str,
    streams: int,
    warmup: float,
    duration: float,
    groups: dict[str, list[int]],
    procs: int | None = None,
    profile=None,
) -> dict:
    """One load run; `groups` are the pids whose CPU is read over the window."""
    procs = procs or (2 if streams >= 500 else 1)
    start_at = time.time() + 1.5  # time for the generator processes to start
    children = []
    for i in range(procs):
        share = streams // procs + (1 if i < streams % procs else 0)
        gen_kind = "sluice" if kind.startswith("sluice") else kind
        cmd = [sys.executable, "-m", "bench.loadgen", "--kind", gen_kind, "--url", url]
        cmd += ["--streams", str(share), "--rate", str(RATE), "--tokens", TOKENS]
        cmd += ["--warmup", str(warmup), "--duration", str(duration)]
        cmd += ["--start-at", f"{start_at:.3f}", "--first-stream", str(i * 100_000)]
        children.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True))
    groups = {**groups, "loadgen": [c.pid for c in children]}
    time.sleep(max(0.0, start_at + warmup - time.time()))
    cpu0 = {name: cpu_seconds(pids) for name, pids in groups.items()}
    if profile is not None:
        profile(duration)  # e.g. py-spy on the workers over the window
    time.sleep(max(0.0, start_at + warmup + duration - time.time()))
    cpu1 = {name: cpu_seconds(pids) for name, pids in groups.items()}
    parts = []
    for child in children:
        out, _ = child.communicate(timeout=loadgen.DRAIN + 30)
        parts.append(json.loads(out))
    summary = loadgen.summarize(loadgen.merge(parts))
    summary["cpu_cores"] = {name: (cpu1[name] - cpu0[name]) / duration for name in groups}
    summary["kind"] = kind
    return summary


def _f(value: float, digits: int = 1) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


def row(r: dict, direct: dict | None) -> list:
    cores = r["cpu_cores"]
    ratio = r["delivered_tps"] / direct["delivered_tps"] if direct else math.nan
    return [
        DESIGNS[r["kind"]],
        r["streams"],
        r["offered_tps"],
        f"{r['delivered_tps']:.0f}",
        "1.00" if r["kind"] == "direct" else _f(ratio, 2),
        _f(r["ttft_p50_ms"]),
        _f(r["ttft_p99_ms"]),
        _f(r["gap_p50_ms"]),
        _f(r["gap_p99_ms"]),
        r["errors"],
        _f(cores["server"] * 1e6 / r["delivered_tps"], 0) if "server" in cores else "–",
        f"{cores.get('server', 0):.2f} / {cores['simulator']:.2f} / {cores['redis']:.2f} / "
        f"{cores['loadgen']:.2f} ({r['processes']}p)",
    ]


def run(
    quick: bool = False,
    kinds=("direct", "sluice", "sluice0", "sluice50", "common"),
    levels: tuple[int, ...] | None = None,
    duration: float | None = None,
) -> dict:
    levels = levels or (QUICK_LEVELS if quick else LEVELS)
    warmup = 3.0 if quick else 5.0
    duration = duration or (6.0 if quick else 20.0)
    results: list[dict] = []
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", str(RATE), "--delay", "0")
        base = {"simulator": [sim.proc.pid], "redis": [redis_server.proc.pid]}
        sim_url = sim.base
        server = None
        if "sluice" in kinds:
            server = stack.sluice(redis_server, sim)
        for n in levels:
            for kind in ("direct", "sluice"):
                if kind not in kinds:
                    continue
                groups = dict(base)
                if kind == "sluice":
                    url, groups["server"] = server.base, server.worker_pids()
                else:
                    url = sim_url
                r = run_load(kind, url, n, warmup, duration, groups)
                results.append(r)
                print(f"bench.load: {kind} {n}: {json.dumps(_brief(r))}", file=sys.stderr)
                wait_sim_idle(sim, 30)
        if server is not None:
            stack.release(server)
        for variant, interval in VARIANTS.items():  # Sluice with other relay pauses
            if variant not in kinds:
                continue
            server = stack.sluice(redis_server, sim, RELAY_INTERVAL_MS=interval)
            groups = {**base, "server": server.worker_pids()}
            r = run_load(variant, server.base, TARGET_N, warmup, duration, groups)
            results.append(r)
            print(f"bench.load: {variant} {TARGET_N}: {json.dumps(_brief(r))}", file=sys.stderr)
            stack.release(server)
            wait_sim_idle(sim, 30)
        if "common" in kinds:
            common = stack.common(sim)
            groups = {**base, "server": common.worker_pids()}
            r = run_load("common", common.base, TARGET_N, warmup, duration, groups)
            results.append(r)
            print(f"bench.load: common {TARGET_N}: {json.dumps(_brief(r))}", file=sys.stderr)
        stats = sim_stats(sim)
    return report(results, stats, warmup, duration)


def _brief(r: dict) -> dict:
    keys = ("delivered_tps", "ttft_p50_ms", "ttft_p99_ms", "gap_p99_ms", "errors", "cpu_cores")
    return {k: r[k] for k in keys}


def report(results: list[dict], sim_stats_end: dict, warmup: float, duration: float) -> dict:
    direct = {r["streams"]: r for r in results if r["kind"] == "direct"}
    rows = [row(r, direct.get(r["streams"])) for r in results]
    table = md_table(
        [
            "target",
            "streams",
            "offered tok/s",
            "delivered tok/s",
            "vs direct",
            "TTFT p50 ms",
            "TTFT p99 ms",
            "gap p50 ms",
            "gap p99 ms",
            "errors",
            "server CPU µs / delivered token",
            "CPU cores: server / simulator / redis / loadgen",
        ],
        rows,
    )
    checks = []
    d = direct.get(TARGET_N)
    for r in results:
        if r["streams"] != TARGET_N or r["kind"] == "direct" or d is None:
            continue
        ratio = r["delivered_tps"] / d["delivered_tps"]
        extra = r["ttft_p50_ms"] - d["ttft_p50_ms"]
        checks.append(
            {
                "design": DESIGNS[r["kind"]],
                "delivered_ratio": ratio,
                "delivered_ok": ratio >= 0.9,
                "ttft_extra_ms": extra,
                "ttft_ok": extra <= 20.0,
            }
        )
    lines = [
        f"- {c['design']} at {TARGET_N} × {RATE}: delivered {c['delivered_ratio']:.2f} × direct "
        f"(target ≥ 0.90: {'met' if c['delivered_ok'] else 'MISSED'}); TTFT p50 = direct "
        f"{c['ttft_extra_ms']:+.1f} ms (target ≤ +20 ms: {'met' if c['ttft_ok'] else 'MISSED'})"
        for c in checks
    ]
    ceiling = generator_note(results)
    markdown = (
        f"### Load ({RATE} tokens/s per stream, {TOKENS} tokens per stream, window "
        f"{duration:.0f} s after {warmup:.0f} s warm-up, 2 gevent workers)\n\n{table}\n"
        + "\n".join(lines + ([ceiling] if ceiling else []))
        + "\n"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "load.json").write_text(json.dumps(results, indent=1))
    return {"markdown": markdown, "results": results, "checks": checks, "sim": sim_stats_end}


def generator_note(results: list[dict]) -> str:
    """The load generator's own cost and ceiling, measured against the simulator alone."""
    direct = sorted((r for r in results if r["kind"] == "direct"), key=lambda r: r["streams"])
    if not direct:
        return ""
    at = next((r for r in direct if r["streams"] == TARGET_N), direct[-1])
    top = direct[-1]
    per_core = 1e6 / at["loadgen_us_per_event"]
    most = max(r["cpu_cores"]["loadgen"] for r in results)
    most_sluice = max(
        (r["cpu_cores"]["loadgen"] for r in results if r["kind"] != "direct"), default=math.nan
    )
    return (
        f"- Load generator (measured against the simulator alone): "
        f"{at['loadgen_us_per_event']:.0f} µs of CPU per token frame at {at['streams']} streams, "
        f"{top['loadgen_us_per_event']:.0f} µs at {top['streams']} (frames then come in "
        f"bursts): a ceiling of about {per_core:,.0f} frames/s per core and process. The most "
        f"it used in any run was {most:.2f} cores ({top['processes']} processes at "
        f"{top['streams']} streams), at most {most_sluice:.2f} in the Sluice and common-design "
        f"runs, so it was never the limit. At {top['streams']} streams direct the simulator "
        f"(one process: one core at most) used {top['cpu_cores']['simulator']:.2f} cores and "
        f"delivered {top['delivered_tps']:,.0f} of {top['offered_tps']:,} tokens/s: there the "
        f"baseline is limited by the simulator."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", help="comma list of concurrency levels")
    parser.add_argument("--duration", type=float)
    parser.add_argument("--kinds", default="direct,sluice,sluice0,sluice50,common")
    parser.add_argument("--plot", action="store_true", help="write bench/latency.png")
    parser.add_argument("--write", action="store_true", help="append to bench/HISTORY.md")
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.streams.split(",")) if args.streams else None
    result = run(args.quick, tuple(args.kinds.split(",")), levels, args.duration)
    print(result["markdown"])
    if args.plot:
        from bench.plot import plot

        print(f"plot: {plot(result['results'])}")
    if args.write:
        append_results("load", result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
