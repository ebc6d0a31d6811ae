"""Relay efficiency: server CPU per 1,000 relayed tokens, beside the simulator's own CPU.

Starts a real redis-server, the simulator and gunicorn (2 gevent workers),
runs concurrent streams through Sluice, and reads the CPU time (user+system)
of the gunicorn workers from /proc before and after. The baseline in the same
run is the simulator's CPU for producing the same tokens. Each scenario runs
`REPEATS` times in a row and the run with the median server CPU is reported
(a one-second scenario on a shared 2-core box varies by ±30 % from run to run). The common design
(bench/common_design.py) runs the same scenarios under the same gunicorn +
gevent. Figures print as a Markdown table; ``--write`` appends them to
bench/HISTORY.md.

    python -m bench.relay_cpu [--write] [--quick] [--sluice-only]
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Stack, append_results, cpu_seconds, md_table  # noqa: E402

SCENARIOS = [
    # name, streams, tokens per stream, upstream tokens/s per stream (0 = as fast as it can)
    ("paced 50 tok/s", 100, 250, 50),
    ("unthrottled", 20, 2000, 0),
]
QUICK_SCENARIOS = [
    ("paced 50 tok/s", 50, 150, 50),
    ("unthrottled", 10, 1000, 0),
]
VARIANTS = {"sluice0": {"RELAY_INTERVAL_MS": "0"}, "sluice50": {"RELAY_INTERVAL_MS": "50"}}
REPEATS = 3
DESIGNS = {
    "sluice": "Sluice",
    "sluice0": "Sluice, RELAY_INTERVAL_MS=0",
    "sluice50": "Sluice, RELAY_INTERVAL_MS=50",
    "common": "common design",
}


def run_stream(kind: str, port: int, tokens: int, rate: int, results: list, index: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"prompt": f"bench {index} sim:tokens={tokens} sim:rate={rate} sim:delay=0"})
    conn.request("POST", "/api/v1/completions/stream", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = bytearray()
    while chunk := resp.read1(65536):
        data += chunk
    conn.close()
    if kind.startswith("sluice"):
        done = data[data.rindex(b"event: done") :]
        event = json.loads(done.split(b"data: ", 1)[1].split(b"\n", 1)[0])
        results[index] = (event["metadata"]["token_count"], event["reason"])
    else:  # the common design: one data chunk per upstream delta, then {"type": "done"}
        ended = b'"type": "done"' in data and b'"type": "error"' not in data
        results[index] = (data.count(b'data: {"type": "token"'), "stop" if ended else "error")


def scenario(kind: str, server, sim, streams: int, tokens: int, rate: int) -> dict:
    workers = server.worker_pids()
    results: list = [None] * streams
    threads = [
        threading.Thread(target=run_stream, args=(kind, server.port, tokens, rate, results, i))
        for i in range(streams)
    ]
    cpu0, sim0, t0 = cpu_seconds(workers), sim.stats()["cpu_seconds"], time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1, sim1, t1 = cpu_seconds(workers), sim.stats()["cpu_seconds"], time.monotonic()
    relayed = sum(r[0] for r in results)
    reasons = {r[1] for r in results}
    assert reasons == {"stop"}, reasons
    assert relayed == streams * tokens, (relayed, streams * tokens)
    return {
        "tokens": relayed,
        "seconds": t1 - t0,
        "server_ms_per_1k": (cpu1 - cpu0) * 1000 / relayed * 1000,
        "sim_ms_per_1k": (sim1 - sim0) * 1000 / relayed * 1000,
    }


def run(kinds=("sluice", "sluice0", "sluice50", "common"), quick: bool = False) -> dict:
    rows, data = [], {}
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", "0", "--delay", "0")
        for kind in kinds:
            if kind == "common":
                server = stack.common(sim)
            else:
                interval = VARIANTS.get(kind, {})
                server = stack.sluice(redis_server, sim, **interval)
            scenario(kind, server, sim, 4, 200, 0)  # warm up connections and imports
            for name, streams, tokens, rate in QUICK_SCENARIOS if quick else SCENARIOS:
                runs = [scenario(kind, server, sim, streams, tokens, rate) for _ in range(REPEATS)]
                r = sorted(runs, key=lambda x: x["server_ms_per_1k"])[REPEATS // 2]
                data[f"{kind} / {name}"] = r
                rows.append(
                    [
                        DESIGNS[kind],
                        name,
                        f"{streams} × {tokens}",
                        r["tokens"],
                        f"{r['server_ms_per_1k']:.1f}",
                        f"{r['sim_ms_per_1k']:.1f}",
                        f"{r['server_ms_per_1k'] / r['sim_ms_per_1k']:.2f}",
                        f"{r['seconds']:.1f}",
                    ]
                )
            stack.release(server)
    table = md_table(
        [
            "design",
            "scenario",
            "streams × tokens",
            "tokens relayed",
            "server CPU ms / 1k tokens",
            "simulator CPU ms / 1k tokens (baseline)",
            "ratio",
            "wall s",
        ],
        rows,
    )
    markdown = (
        "### Relay CPU (2 gevent workers; target ≤ 25 ms / 1k tokens;"
        f" median of {REPEATS} runs)\n\n{table}"
    )
    return {"markdown": markdown, "data": data}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="append to bench/HISTORY.md")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sluice-only", action="store_true")
    args = parser.parse_args()
    kinds = ("sluice", "sluice0", "sluice50")
    kinds = kinds if args.sluice_only else (*kinds, "common")
    result = run(kinds, args.quick)
    print(result["markdown"])
    if args.write:
        append_results("relay_cpu", result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
