"""Soak: waves of cancelled streams and of dropped slow readers; worker RSS after each wave.

A generation that is stopped (cancel, client gone, send timeout, silent
upstream, shutdown) must be freed as soon as it ends, with its frames and
text; one caught in a reference cycle waits for Python's rare full
collection, and the workers grow wave after wave (issue 15: +332, +587 and
+637 MB over three waves of 30 slow readers). Real gunicorn with 2 gevent
workers, real Redis, the bundled simulator unthrottled
(``DISCONNECT_GRACE_SECONDS=0``, ``SEND_TIMEOUT_SECONDS=3``). Each wave:

- cancels: `cancels` streams one after another, each read until
  `CANCEL_AFTER` bytes of events arrived, then DELETEd and read to its ``done``;
- slow readers: `readers` streams at once from clients that never read (a
  4 KB receive buffer); each generation runs on, its frames piling up, until a
  write to its client waited ``SEND_TIMEOUT_SECONDS`` and the client is
  dropped; it is then cancelled (grace 0), which the simulator records as
  ``client_closed``.

After each wave, once the simulator has no open stream, the summed RSS of the
workers is sampled (median of 3). Target: flat across waves, i.e. what waves 2
and later add on top of wave 1 (allocator arenas warm up in wave 1) stays within
`FLAT_MIB`, whereas pinned generations would add about as much as wave 1 did
every wave.

    python -m bench.soak [--quick] [--waves N] [--cancels N] [--readers N] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import time

from bench.client import Conn, delete_request, post_request
from bench.stack import Stack, append_results, md_table, rss_bytes, sim_stats, wait_sim_idle
from devtools.harness import wait_for

__all__ = ["run"]

CANCEL_AFTER = 1 << 20  # bytes of events read before the DELETE
SEND_TIMEOUT = "3"
FLAT_MIB = 24.0
LONG = "sim:tokens=5000000 sim:rate=0 sim:delay=0"
_tags = itertools.count()


def _tag(kind: str) -> str:
    return f"soak-{kind}-{time.time_ns()}-{next(_tags)}"


def cancel_one(sim, port: int) -> str:
    """One stream read for CANCEL_AFTER bytes, then DELETEd; its final reason."""
    tag = _tag("cancel")
    deadline = time.time() + 60
    conn = Conn(port, timeout=30)
    try:
        conn.send(post_request(port, f"soak {LONG} sim:tag={tag}"))
        assert conn.read_head(deadline) == 200, conn.head
        stream_id = conn.headers["x-stream-id"]
        while len(conn.buf) < CANCEL_AFTER:
            conn._wait(deadline)
            if not conn.recv():
                raise EOFError("stream ended before the cancel")
        conn.buf = conn.buf[-4096:]
        other = Conn(port, timeout=30)
        try:
            other.send(delete_request(port, stream_id))
            assert other.read_head(deadline) == 200, other.head
            other.read_body(deadline)
        finally:
            other.close()
        conn.read_until(b"event: done", deadline)
        done = conn.buf[conn.buf.rindex(b"event: done") :].split(b"data: ", 1)[1]
        return json.loads(done.split(b"\n", 1)[0])["reason"]
    finally:
        conn.close()
        sim.record(tag, timeout=10)


def slow_readers(sim, port: int, count: int) -> list[str]:
    """`count` clients that never read, until Sluice dropped each; the simulator's states."""
    tags = [_tag("slow") for _ in range(count)]
    socks = []
    try:
        for tag in tags:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(post_request(port, f"soak {LONG} sim:tag={tag}"))
            socks.append(sock)
        # each one is dropped once its socket buffers are full and a write then waited
        # SEND_TIMEOUT_SECONDS: several seconds of unthrottled relay on a busy box
        return [
            wait_for(lambda t=tag: _ended(sim, t), 120, "a slow reader dropped") for tag in tags
        ]
    finally:
        for sock in socks:
            sock.close()


def _ended(sim, tag: str) -> str | None:
    state = sim.record(tag, timeout=20)["state"]
    return None if state == "open" else state


def _rss(pids: list[int]) -> int:
    values = []
    for _ in range(3):
        values.append(rss_bytes(pids))
        time.sleep(0.3)  # spaced samples of a settled process (not synchronization)
    return int(statistics.median(values))


def run(
    quick: bool = False,
    waves: int | None = None,
    cancels: int | None = None,
    readers: int | None = None,
) -> dict:
    waves = waves or (3 if quick else 5)
    # a slow reader costs ~1M relayed tokens (its socket buffers fill first): few of them
    cancels = cancels or (10 if quick else 20)
    readers = readers or (4 if quick else 10)
    data: dict = {"waves": [], "cancels": cancels, "readers": readers}
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", "0", "--delay", "0")
        server = stack.sluice(
            redis_server,
            sim,
            DISCONNECT_GRACE_SECONDS="0",
            SEND_TIMEOUT_SECONDS=SEND_TIMEOUT,
        )
        pids = server.worker_pids()
        cancel_one(sim, server.port)  # warm-up: every import and pool in place
        wait_sim_idle(sim, 30)
        base = _rss(pids)
        data["base_rss"] = base
        for wave in range(1, waves + 1):
            started = time.monotonic()
            reasons = [cancel_one(sim, server.port) for _ in range(cancels)]
            states = slow_readers(sim, server.port, readers)
            idle = wait_sim_idle(sim, 60)
            wait_for(lambda: sim_stats(sim)["open_streams"] == 0, 60, "the simulator idle")
            rss = _rss(pids)
            data["waves"].append(
                {
                    "wave": wave,
                    "rss": rss,
                    "cancelled": reasons.count("cancelled"),
                    "readers_dropped": states.count("client_closed"),
                    "idle": idle,
                    "seconds": round(time.monotonic() - started, 1),
                }
            )
            print(f"soak: wave {wave}: {rss / 2**20:.0f} MiB", flush=True)
        data["log_tracebacks"] = server.log_path.read_text(errors="replace").count("Traceback")
    first = data["waves"][0]["rss"]
    last = data["waves"][-1]["rss"]
    data["wave1_added_mib"] = (first - base) / 2**20
    data["after_wave1_mib"] = (last - first) / 2**20
    data["flat"] = data["after_wave1_mib"] <= FLAT_MIB
    rows = [["before (warmed up)", f"{base / 2**20:.0f}", "–", "–", "–"]]
    previous = base
    for w in data["waves"]:
        rows.append(
            [
                f"after wave {w['wave']}",
                f"{w['rss'] / 2**20:.0f}",
                f"{(w['rss'] - previous) / 2**20:+.1f}",
                f"{w['cancelled']}/{cancels} cancelled, "
                f"{w['readers_dropped']}/{readers} slow readers dropped",
                f"{w['seconds']:g} s",
            ]
        )
        previous = w["rss"]
    table = md_table(["", "worker RSS (MiB, 2 workers)", "change", "wave", "took"], rows)
    verdict = "met" if data["flat"] else "MISSED"
    markdown = (
        f"### Soak: {waves} waves of {cancels} cancelled streams (each cancelled after "
        f"{CANCEL_AFTER >> 20} MiB of events) and {readers} slow readers (dropped after "
        f"SEND_TIMEOUT_SECONDS={SEND_TIMEOUT})\n\n{table}\n"
        f"Waves 2–{waves} added {data['after_wave1_mib']:+.1f} MiB on top of wave 1 "
        f"(wave 1: {data['wave1_added_mib']:+.1f} MiB); target ≤ {FLAT_MIB:g} MiB: {verdict}. "
        f"Tracebacks in the server log: {data['log_tracebacks']}.\n"
    )
    return {"data": data, "markdown": markdown}


def main() -> int:
    parser = argparse.ArgumentParser("python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--waves", type=int)
    parser.add_argument("--cancels", type=int, help="cancelled streams per wave")
    parser.add_argument("--readers", type=int, help="slow readers per wave")
    parser.add_argument("--write", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    result = run(args.quick, args.waves, args.cancels, args.readers)
    print(result["markdown"])
    if args.write:
        append_results("Soak", result["markdown"])
    return 0 if result["data"]["flat"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
