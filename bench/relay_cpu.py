"""Relay efficiency: server CPU per 1,000 relayed tokens, beside the simulator's own CPU.

Starts a real redis-server, the simulator and gunicorn (2 gevent workers),
runs concurrent streams through Sluice, and reads the CPU time (user+system)
of the gunicorn workers from /proc before and after. The baseline in the same
run is the simulator's CPU for producing the same tokens. Figures print as a
Markdown table; ``--write`` appends them to bench/RESULTS.md.

    python -m bench.relay_cpu [--write]
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import sys
import threading
import time
from datetime import date
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import RedisServer, Simulator, Sluice  # noqa: E402

SCENARIOS = [
    # name, streams, tokens per stream, upstream tokens/s per stream (0 = as fast as it can)
    ("paced 50 tok/s", 100, 250, 50),
    ("unthrottled", 20, 2000, 0),
]


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def run_stream(port: int, tokens: int, rate: int, results: list, index: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"prompt": f"bench {index} sim:tokens={tokens} sim:rate={rate} sim:delay=0"})
    conn.request("POST", "/api/v1/completions/stream", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = bytearray()
    while chunk := resp.read1(65536):
        data += chunk
    conn.close()
    done = data[data.rindex(b"event: done") :]
    results[index] = json.loads(done.split(b"data: ", 1)[1].split(b"\n", 1)[0])


def scenario(server: Sluice, sim: Simulator, streams: int, tokens: int, rate: int) -> dict:
    workers = server.worker_pids()
    results: list = [None] * streams
    threads = [
        threading.Thread(target=run_stream, args=(server.port, tokens, rate, results, i))
        for i in range(streams)
    ]
    cpu0, sim0, t0 = cpu_seconds(workers), sim.stats()["cpu_seconds"], time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1, sim1, t1 = cpu_seconds(workers), sim.stats()["cpu_seconds"], time.monotonic()
    relayed = sum(r["metadata"]["token_count"] for r in results)
    reasons = {r["reason"] for r in results}
    assert reasons == {"stop"}, reasons
    return {
        "tokens": relayed,
        "seconds": t1 - t0,
        "server_ms_per_1k": (cpu1 - cpu0) * 1000 / relayed * 1000,
        "sim_ms_per_1k": (sim1 - sim0) * 1000 / relayed * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    redis_server = RedisServer().start()
    sim = Simulator("--rate", "0", "--delay", "0").start()
    server = Sluice(
        {"REDIS_URL": redis_server.url, "OPENAI_BASE_URL": sim.v1, "OPENAI_API_KEY": "sk-bench"},
        workers=2,
    ).start()
    rows = []
    try:
        scenario(server, sim, 4, 200, 0)  # warm up connections and imports
        for name, streams, tokens, rate in SCENARIOS:
            r = scenario(server, sim, streams, tokens, rate)
            rows.append(
                f"| {name} | {streams} × {tokens} | {r['tokens']} | {r['server_ms_per_1k']:.1f} | "
                f"{r['sim_ms_per_1k']:.1f} | {r['server_ms_per_1k'] / r['sim_ms_per_1k']:.2f} | "
                f"{r['seconds']:.1f} |"
            )
    finally:
        server.stop()
        sim.stop()
        redis_server.stop()
    header = (
        f"### relay_cpu — {date.today()} — {platform.machine()}, {psutil.cpu_count()} cores, "
        f"2 gevent workers\n\n"
        "| scenario | streams × tokens | tokens relayed | Sluice server CPU ms / 1k tokens | "
        "simulator CPU ms / 1k tokens (baseline) | ratio | wall s |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
    )
    table = header + "\n".join(rows) + "\n"
    print(table)
    if args.write:
        with open(Path(__file__).with_name("RESULTS.md"), "a") as out:
            out.write("\n" + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
