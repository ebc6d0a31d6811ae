"""The benchmark suite: ``python -m bench [--quick] [--only STEPS] [--no-write]``.

Runs, one at a time (a 2-core box: nothing else should run meanwhile), each
with its own real processes on 127.0.0.1 and each bounded in time:

- relay   bench/relay_cpu.py   server CPU per 1,000 relayed tokens (Sluice at 100/0/50 ms, common)
- load    bench/load.py        N streams x 50 tok/s, Sluice vs direct (+ 0/50 ms, common at 200),
                               and the plot bench/latency.png (bench/plot.py)
- cancel  bench/cancel.py      DELETE -> done / upstream closed, across workers and servers
- disconnect bench/disconnect.py  client gone -> upstream closed (chatty, silent upstream)
- memory  bench/memory.py      RSS per idle stream at 1,000 and 5,000 streams
- startcpu bench/starts.py     worker CPU per stream start (beside a bare Flask route, common)
- single  bench/starts.py      one stream alone: added TTFT over direct (median of 15)
- burst   bench/starts.py      200 streams started at the same instant, Sluice vs direct
- storm   bench/storm.py       300 detached generations on server A, 300 resumes at once on B
- soak    bench/soak.py        waves of cancelled streams and dropped slow readers: RSS per wave
- failover bench/failover.py   the primary upstream SIGKILLed during 200 streams: share served,
                               errors (only streams begun on it), added TTFT (issue 20)
- hotspots bench/hotspots.py   py-spy profile of the workers when a load target is missed
                               (and a tracemalloc probe when the memory target is missed)

Every figure prints next to its baseline measured in the same run, and the
whole section (date, machine, exact command, targets met or missed) is
written to bench/RESULTS.md as its latest suite unless ``--no-write`` (the suite
it replaces moves to the end of bench/HISTORY.md). ``--quick`` is a short
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

from bench.stack import OUT, RESULTS, ROOT, machine, md_table, now, raise_nofile, write_results

STEPS = ("relay", "load", "cancel", "disconnect", "memory")
STEPS += ("startcpu", "single", "burst", "storm")  # issue 14: stream starts, reconnect storm
STEPS += ("soak",)  # issue 15: stopped streams are freed (worker RSS flat across waves)
STEPS += ("failover",)  # issue 20: several upstreams, failover before the first token
STEPS += ("hotspots",)
RELAY_TARGET_MS = 25  # ms of worker CPU per 1,000 relayed tokens (issue 14; was 40)
MEMORY_TARGET_KB = 40  # per idle stream (issue 14; was 64)


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
                    f"≤ {RELAY_TARGET_MS:g} ms / 1k tokens",
                    f"{r['server_ms_per_1k']:.0f} ms / 1k",
                    f"simulator {r['sim_ms_per_1k']:.0f}"
                    + (f"; Sluice unbatched {z['server_ms_per_1k']:.0f}" if z else "")
                    + (f"; common design {c['server_ms_per_1k']:.0f}" if c else ""),
                    r["server_ms_per_1k"] <= RELAY_TARGET_MS,
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
                f"≤ {MEMORY_TARGET_KB:g} KB",
                f"{d['per_stream_kb']:.1f} KB",
                f"RSS at 0 streams {memory['data']['base_rss'] / 2**20:.0f} MiB",
                d["per_stream_kb"] <= MEMORY_TARGET_KB,
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
    start_rows(results, add)
    failover = results.get("failover")
    if failover:
        d = failover["data"]
        add(
            "failover: primary killed during 200 streams",
            "all started after it served; errors only on streams begun on it; "
            "added TTFT p50 ≤ 100 ms",
            f"{d['after_kill_served']}/{d['after_kill']} served; "
            f"{d['errors_begun_on_primary']} begun on it + {d['other_failures']} other errors; "
            f"{d['server_added_ttft_p50_ms']:+.1f} ms (client-side {d['added_ttft_p50_ms']:+.1f})",
            f"TTFT before the kill {d['server_ttft_before_p50_ms']:.1f} ms",
            d["ok"],
        )
    soak = results.get("soak")
    if soak:
        d = soak["data"]
        add(
            "soak: worker RSS, waves 2+ over wave 1",
            "≤ 24 MiB (flat)",
            f"{d['after_wave1_mib']:+.1f} MiB",
            f"wave 1 {d['wave1_added_mib']:+.1f} MiB over the warmed-up workers",
            d["flat"],
        )
    table = md_table(["figure", "target", "Sluice", "baseline (same run)", "verdict"], rows)
    return table, missed


def start_rows(results: dict, add) -> None:
    """The target rows of issue 14: stream starts (CPU, alone, burst) and the reconnect storm."""
    from bench import starts, storm

    cpu = results.get("startcpu")
    if cpu and "sluice" in cpu["data"]:
        d = cpu["data"]
        base = [f"bare Flask route {d['health']['ms']:.2f} ms"] if "health" in d else []
        base += [f"common design {d['common']['ms']:.2f} ms"] if "common" in d else []
        add(
            "stream start: worker CPU per start",
            f"≤ {starts.TARGET_START_MS:g} ms",
            f"{d['sluice']['ms']:.2f} ms ({d['sluice']['errors']} errors)",
            "; ".join(base) or "–",
            d["sluice"]["ms"] <= starts.TARGET_START_MS and d["sluice"]["errors"] == 0,
        )
    single = results.get("single")
    if single:
        d = single["data"]
        add(
            f"one stream alone: added TTFT (median of {d.get('tries', 15)})",
            f"≤ {starts.TARGET_SINGLE_MS:g} ms",
            f"{d['added_ms']:+.2f} ms (TTFT {d['sluice_ms']:.2f} ms)",
            f"direct {d['direct_ms']:.2f} ms",
            d["added_ms"] <= starts.TARGET_SINGLE_MS,
        )
    burst = results.get("burst")
    if burst:
        d = burst["data"]
        s, b = d["median"]["sluice"], d["median"]["direct"]
        n = f"burst {starts.BURST_N}"
        add(
            f"{n}: delivered tokens/s",
            f"≥ {starts.TARGET_BURST_RATIO} × direct",
            f"{s['delivered_tps']:.0f} ({d['ratio']:.2f} × direct; {s['errors']} errors)",
            f"direct {b['delivered_tps']:.0f}",
            d["ratio"] >= starts.TARGET_BURST_RATIO and s["errors"] == 0,
        )
        add(
            f"{n}: TTFT p50",
            f"≤ direct + {starts.TARGET_BURST_TTFT_MS:g} ms",
            f"{s['ttft_p50_ms']:.1f} ms (direct {d['ttft_extra_ms']:+.1f})",
            f"direct {b['ttft_p50_ms']:.1f} ms",
            d["ttft_extra_ms"] <= starts.TARGET_BURST_TTFT_MS,
        )
    st = results.get("storm")
    if st:
        d = st["data"]
        runs = d["runs"]
        add(
            f"storm {d['streams']}: resumes complete, nothing lost",
            "all, 0 lost, every run",
            " / ".join(f"{r['complete']}" for r in runs)
            + f" of {d['streams']} complete; lost {' / '.join(str(r['lost']) for r in runs)}",
            "–",
            d["all_complete"] and d["lost"] == 0,
        )
        add(
            f"storm {d['streams']}: first replayed event p50 (worst run)",
            f"≤ {storm.TARGET_FIRST_EVENT_MS:g} ms",
            f"{d['first_event_p50_ms']:.0f} ms",
            f"one resume alone {d['alone_ms']:.1f} ms",
            d["first_event_p50_ms"] <= storm.TARGET_FIRST_EVENT_MS,
        )
        bound = d["bound"]
        add(
            "storm: Redis connections per worker of B (most)",
            f"≤ {bound} (the stated bound)" if bound else "bounded",
            str(d["redis_conns_per_worker"]),
            f"before the storms {d['idle'].get('B', 0)}",
            d["redis_conns_per_worker"] <= bound if bound else None,
        )


def main() -> int:
    parser = argparse.ArgumentParser("python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short version (smoke test)")
    parser.add_argument("--only", help=f"comma list of steps: {','.join(STEPS)}")
    parser.add_argument("--no-write", action="store_true", help="do not write RESULTS.md")
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

    from bench import starts, storm

    step("startcpu", lambda: starts.run_startcpu(args.quick))
    step("single", lambda: starts.run_single(args.quick))
    step("burst", lambda: starts.run_burst(args.quick))
    step("storm", lambda: storm.run(args.quick))
    from bench import soak

    step("soak", lambda: soak.run(args.quick))
    from bench import failover

    step("failover", lambda: failover.run(args.quick))
    if {"single", "burst", "storm"} & results.keys():  # redraw the plot with their panel
        loaded = "load" in results and not (args.quick or args.no_write)
        OUT.mkdir(exist_ok=True)
        path = plot(
            results.get("load", {}).get("results", []),
            PNG if loaded else OUT / "latency.png",
            starts={k: results[k]["data"] for k in ("single", "burst", "storm") if k in results},
        )
        sections.append(
            f"![TTFT and throughput; stream starts and the storm]({PNG.name})\n"
            if loaded
            else f"Plot with the start and storm panel (not kept): `{path.relative_to(ROOT)}`\n"
        )
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
        write_results(report)
        print(f"written to {RESULTS.relative_to(ROOT)} (the suite it replaced: bench/HISTORY.md)")
    print(f"bench: total {elapsed:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
