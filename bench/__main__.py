"""The benchmark suite: ``python -m bench [--quick] [--only STEPS] [--no-write]``.

Runs, one at a time (a 2-core box: nothing else should run meanwhile), each
with its own real processes on 127.0.0.1 and each bounded in time:

- relay   bench/relay_cpu.py   server CPU per 1,000 relayed tokens (Sluice at 100/0/50 ms, common)
- load    bench/load.py        N streams x 50 tok/s, Sluice vs direct (+ 0/50 ms, common at 200),
                               and the plot bench/latency.png (bench/plot.py)
- cancel  bench/cancel.py      DELETE -> done / upstream closed, across workers and servers
- disconnect bench/disconnect.py  client gone -> upstream closed (chatty, silent upstream)
- memory  bench/memory.py      RSS per idle stream at 1,000 and 5,000 streams
- hotspots bench/hotspots.py   py-spy profile of the workers when a load target is missed
                               (and a tracemalloc probe when the memory target is missed)

Every figure prints next to its baseline measured in the same run, and the
whole section (date, machine, exact command, targets met or missed) is
appended to bench/RESULTS.md unless ``--no-write``. ``--quick`` is a short
version (fewer levels, tries and seconds; no profiles) for a smoke test.
Raw figures go to bench/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

from bench.stack import OUT, RESULTS, ROOT, machine, md_table, now, raise_nofile

STEPS = ("relay", "load", "cancel", "disconnect", "memory", "hotspots")


def _command() -> str:
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(ROOT)
    except ValueError:
        pass
    return " ".join([str(exe), "-m", "bench", *sys.argv[1:]])


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**MISSED**")


def _ms(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.1f} ms"


def targets(results: dict) -> tuple[str, list[str]]:
    """The target table, and the list of missed targets."""
    rows, missed = [], []

    def add(figure: str, target: str, measured: str, baseline: str, ok: bool | None) -> None:
        rows.append([figure, target, measured, baseline, _verdict(ok)])
        if ok is False:
            missed.append(figure)

    relay = results.get("relay")
    if relay:
        for name in ("paced 50 tok/s", "unthrottled"):
            r = relay["data"].get(f"sluice / {name}")
            c = relay["data"].get(f"common / {name}")
            z = relay["data"].get(f"sluice0 / {name}")
            if r:
                add(
                    f"relay CPU, {name}",
                    "≤ 40 ms / 1k tokens",
                    f"{r['server_ms_per_1k']:.0f} ms / 1k",
                    f"simulator {r['sim_ms_per_1k']:.0f}"
                    + (f"; Sluice unbatched {z['server_ms_per_1k']:.0f}" if z else "")
                    + (f"; common design {c['server_ms_per_1k']:.0f}" if c else ""),
                    r["server_ms_per_1k"] <= 40,
                )
    load = results.get("load")
    if load:
        direct = {r["streams"]: r for r in load["results"] if r["kind"] == "direct"}
        for r in load["results"]:
            d = direct.get(r["streams"])
            if r["kind"] != "sluice" or r["streams"] != 200 or d is None:
                continue
            ratio = r["delivered_tps"] / d["delivered_tps"]
            common = next((c for c in load["results"] if c["kind"] == "common"), None)
            z = next((c for c in load["results"] if c["kind"] == "sluice0"), None)
            add(
                "load 200 × 50: delivered tokens/s",
                "≥ 0.9 × direct",
                f"{r['delivered_tps']:.0f} ({ratio:.2f} × direct)",
                f"direct {d['delivered_tps']:.0f}"
                + (f"; Sluice unbatched {z['delivered_tps']:.0f}" if z else "")
                + (f"; common design {common['delivered_tps']:.0f}" if common else ""),
                ratio >= 0.9,
            )
            add(
                "load 200 × 50: TTFT p50",
                "≤ direct + 20 ms",
                _ms(r["ttft_p50_ms"]),
                f"direct {_ms(d['ttft_p50_ms'])}"
                + (f"; Sluice unbatched {_ms(z['ttft_p50_ms'])}" if z else "")
                + (f"; common design {_ms(common['ttft_p50_ms'])}" if common else ""),
                r["ttft_p50_ms"] <= d["ttft_p50_ms"] + 20,
            )
    cancel = results.get("cancel")
    if cancel:
        base = cancel["data"].get("baseline", {})
        for where in ("other worker", "other server"):
            s = cancel["data"].get(f"sluice / {where}")
            if not s:
                continue
            add(
                f"cancel across {where.split()[1]}s: DELETE → done p99",
                "≤ 50 ms",
                _ms(s["done_p99"]) + f" ({s['stopped']}/{s['tries']} stopped)",
                "–",
                s["done_p99"] <= 50 and s["stopped"] == s["tries"],
            )
            add(
                f"cancel across {where.split()[1]}s: DELETE → upstream closed p99",
                "≤ 50 ms",
                _ms(s["upstream_p99"]),
                f"client closing the upstream itself: {_ms(base.get('p99', math.nan))}",
                s["upstream_p99"] <= 50,
            )
        c = cancel["data"].get("common / other worker")
        r = cancel["data"].get("common / random worker")
        if c and r:
            add(
                "common design: DELETE stops the stream",
                "(comparison)",
                f"other worker: {c['stopped']}/{c['tries']} ({c['not_found_404']} × 404); "
                f"random worker: {r['stopped']}/{r['tries']} ({r['not_found_404']} × 404)",
                "Sluice: every try, any worker, any server",
                None,
            )
    disconnect = results.get("disconnect")
    if disconnect:
        grace = disconnect["grace"]
        for key, s in disconnect["data"].items():
            if not key.endswith("/ Sluice"):
                continue
            upstream = key.split(" / ")[0]
            base = disconnect["data"].get(key.replace("Sluice", "direct (baseline)"), {})
            add(
                f"disconnect → upstream closed p99, {upstream}",
                f"≤ grace + 100 ms (grace {grace:g} s)",
                _ms(s["p99"]),
                f"direct {_ms(base.get('p99', math.nan))}",
                s["p99"] <= grace * 1000 + 100 and s["closed"] == s["tries"],
            )
    memory = results.get("memory")
    if memory:
        levels = memory["data"]["levels"]
        for level, d in levels.items():
            holder = d["holder"]
            errors = sum(holder["errors"].values()) + (0 if d["all_upstreams_open"] else 1)
            add(
                f"memory per idle stream at {level}",
                "≤ 64 KB",
                f"{d['per_stream_kb']:.1f} KB",
                f"RSS at 0 streams {memory['data']['base_rss'] / 2**20:.0f} MiB",
                d["per_stream_kb"] <= 64,
            )
            if level == max(levels):
                add(
                    f"no errors at {level} idle streams",
                    "0 errors",
                    f"{errors} errors, {holder['ready']}/{level} started, "
                    f"{d['log_problems']} error lines in the log",
                    "–",
                    errors == 0 and d["log_problems"] == 0 and holder["ready"] == level,
                )
    table = md_table(["figure", "target", "Sluice", "baseline (same run)", "verdict"], rows)
    return table, missed


def main() -> int:
    parser = argparse.ArgumentParser("python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version (smoke test)")
    parser.add_argument("--only", help=f"comma list of steps: {','.join(STEPS)}")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    steps = tuple(args.only.split(",")) if args.only else STEPS
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    soft, hard = raise_nofile()
    started = time.monotonic()
    print(f"bench: {machine()}; open files limit {soft}/{hard}", flush=True)
    results: dict = {}
    failed: dict[str, str] = {}
    sections: list[str] = []

    def step(name: str, fn) -> None:
        if name not in steps:
            return
        t0 = time.monotonic()
        print(f"\n=== {name} ===", flush=True)
        try:
            results[name] = fn()
        except Exception:
            failed[name] = traceback.format_exc()
            print(failed[name], file=sys.stderr, flush=True)
            sections.append(f"### {name}: FAILED\n\n```\n{failed[name][-1500:]}```\n")
            return
        print(results[name]["markdown"], flush=True)
        sections.append(results[name]["markdown"])
        print(f"({name}: {time.monotonic() - t0:.0f} s)", flush=True)

    from bench import cancel, disconnect, hotspots, load, memory, relay_cpu
    from bench.plot import PNG, plot

    step("relay", lambda: relay_cpu.run(quick=args.quick))

    def load_and_plot() -> dict:
        result = load.run(args.quick)
        if args.quick or args.no_write:  # keep bench/latency.png for the recorded runs
            OUT.mkdir(exist_ok=True)
            path = plot(result["results"], OUT / "latency.png")
            result["markdown"] += f"\nPlot (not kept): `{path.relative_to(ROOT)}`\n"
        else:
            plot(result["results"], PNG)
            result["markdown"] += f"\n![TTFT and throughput against concurrency]({PNG.name})\n"
        return result

    step("load", load_and_plot)
    step("cancel", lambda: cancel.run(args.quick))
    step("disconnect", lambda: disconnect.run(args.quick))

    def memory_and_probe() -> dict:
        result = memory.run(args.quick)
        over = any(d["per_stream_kb"] > memory.TARGET_KB for d in result["data"]["levels"].values())
        if over and not args.quick:
            result["probe"] = memory.probe()
            result["markdown"] += "\n" + result["probe"]["markdown"]
        return result

    step("memory", memory_and_probe)
    load_missed = any(
        not (c["delivered_ok"] and c["ttft_ok"])
        for c in results.get("load", {}).get("checks", [])
        if c["design"] == "Sluice"
    )
    if "hotspots" in steps and not args.quick and (load_missed or args.only):
        step("hotspots", hotspots.run)

    elapsed = time.monotonic() - started
    table, missed = targets(results)
    header = (
        f"## Suite{' (quick)' if args.quick else ''} — {now()}\n\n"
        f"- machine: {machine()}\n"
        f"- command: `{_command()}` (from the repository root), wall time "
        f"{elapsed / 60:.1f} min; open-files limit raised to {soft} (children inherit it)\n"
        "- every process on 127.0.0.1; one benchmark at a time; load generator: "
        "bench/loadgen.py (gevent, raw sockets) in its own process(es)\n\n"
        f"### Targets\n\n{table}\n"
        + (f"Missed: {'; '.join(missed)}.\n" if missed else "All targets met.\n")
        + (f"\nSteps that failed: {', '.join(failed)}.\n" if failed else "")
    )
    report = header + "\n" + "\n".join(sections)
    print("\n" + header)
    OUT.mkdir(exist_ok=True)
    (OUT / "suite.json").write_text(json.dumps(results, indent=1, default=str))
    if not args.no_write:
        with open(RESULTS, "a") as out:
            out.write("\n" + report)
        print(f"appended to {RESULTS.relative_to(ROOT)}")
    print(f"bench: total {elapsed:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
