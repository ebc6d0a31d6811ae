"""Cancel latency: DELETE sent -> ``done`` received on the stream, and DELETE sent -> upstream
connection closed (the simulator's record ``ended``; same machine, same clock).

Two gunicorn servers (A and B, 2 gevent workers each) share one Redis. Each
try starts a chatty stream on A (``sim:rate=50``), reads its first token,
then sends the DELETE over a connection that a chosen worker accepted
(checked in /proc, like tests/test_cancel.py): the worker running the stream,
the other worker of A, or server B. One try at a time; both sockets are
watched with select() so the ``done`` frame and the DELETE answer are
timestamped by the receive that carried them. Target: p99 <= 50 ms across
workers and across servers.

Baseline in the same run: a client talking straight to the simulator closes
its connection (the simulator's own EOF detection: the floor of "upstream
closed").

The common design (bench/common_design.py, same gunicorn + gevent, 2
workers) is measured the same way, its DELETE sent over a lone new connection
(whichever worker gunicorn hands it to: on an idle box mostly the stream's
own), over a connection to a worker drawn 50/50 (as a balanced load spreads
requests), and forced onto the other worker: its DELETE only looks in its own
worker's dict.

    python -m bench.cancel [--quick] [--tries N] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time

from bench.client import Conn, delete_request, post_request, wait_readable
from bench.disconnect import close_try
from bench.stack import (
    Stack,
    append_results,
    md_table,
    pct,
    wait_sim_idle,
    workers_of_connections,
)

__all__ = ["run"]

CHATTY = "sim:tokens=3000 sim:rate=50 sim:delay=0"
CHATTY_SHORT = "sim:tokens=500 sim:rate=50 sim:delay=0"
TARGET_MS = 50.0
_tags = itertools.count()


_worker_pids: dict[int, list[int]] = {}  # gunicorn master pid -> its workers (fixed)


def worker_pids(server) -> list[int]:
    pids = _worker_pids.get(server.proc.pid)
    if pids is None:
        pids = _worker_pids[server.proc.pid] = server.worker_pids()
    return pids


def workers_of(server, conns: list[Conn], timeout: float = 5.0) -> list[int]:
    """The worker pid that accepted each connection (polls /proc until all are accepted)."""
    pids = worker_pids(server)
    ports = [c.local_port for c in conns]
    deadline = time.monotonic() + timeout
    while True:
        found = workers_of_connections(pids, server.port, ports)
        if len(found) == len(ports):
            return [found[p] for p in ports]
        if time.monotonic() > deadline:
            raise AssertionError("connections not accepted in time")
        time.sleep(0.002)


def worker_of(server, conn: Conn) -> int:
    return workers_of(server, [conn])[0]


def conn_on(server, want) -> tuple[Conn, int]:
    """A connection to `server` accepted by a worker for which want(pid) holds (connections
    are opened four at a time: an idle gunicorn tends to hand a lone one to the same worker)."""
    for _ in range(50):
        batch = [Conn(server.port) for _ in range(4)]
        chosen = None
        for conn, pid in zip(batch, workers_of(server, batch), strict=True):
            if chosen is None and want(pid):
                chosen = (conn, pid)
            else:
                conn.close()
        if chosen is not None:
            return chosen
    raise AssertionError("no connection reached the wanted worker")


def one_try(kind: str, a, b, sim, where: str) -> dict:
    """Start a stream on server `a`, DELETE it per `where`; times in ms from the DELETE."""
    tag = f"cancel-{time.time_ns()}-{next(_tags)}"
    token, stopped = (
        (b"event: token", b"event: done")
        if kind == "sluice"
        else (b'"type": "token"', b'"type": "cancelled"')
    )
    deadline = time.time() + 10
    stream = Conn(a.port)
    # The common design's streams that a DELETE misses keep their upstream open after we
    # leave (see bench/disconnect.py): short ones (10 s) so that they end by themselves.
    directives = CHATTY if kind == "sluice" else CHATTY_SHORT
    stream.send(post_request(a.port, f"cancel me {directives} sim:tag={tag}"))
    dconn = None
    try:
        assert stream.read_head(deadline) == 200, stream.head
        stream_id = stream.headers["x-stream-id"]
        stream.read_until(token, deadline)
        owner = worker_of(a, stream)
        if where == "same worker":
            dconn, dpid = conn_on(a, lambda pid: pid == owner)
        elif where == "other worker":
            dconn, dpid = conn_on(a, lambda pid: pid != owner)
        elif where == "other server":
            dconn, dpid = conn_on(b, lambda pid: True)
        elif where == "random worker":  # 50/50, as a balanced load spreads requests
            pick = random.choice(worker_pids(a))
            dconn, dpid = conn_on(a, lambda pid: pid == pick)
        else:  # "whichever accepts": a lone new connection, as gunicorn hands it out
            dconn = Conn(a.port)
            dpid = worker_of(a, dconn)
        stream.buf = b""
        sent = time.time()
        dconn.send(delete_request(dconn.sock.getpeername()[1], stream_id))
        done_at = answered_at = None
        status, body = 0, {}
        limit = sent + 5
        while (done_at is None or answered_at is None) and time.time() < limit:
            waiting = [c for c, t in ((stream, done_at), (dconn, answered_at)) if t is None]
            for conn in wait_readable(waiting, limit):
                if not conn.recv():
                    limit = min(limit, time.time())  # EOF
                    continue
                at = time.time()
                if conn is stream and stopped in stream.buf:
                    done_at = at
                elif conn is dconn and b"\r\n\r\n" in dconn.buf:
                    status = dconn.read_head(limit)
                    body = json.loads(dconn.read_body(limit) or b"{}")
                    answered_at = time.time()
                    if status != 200:  # not found: see whether it stops anyway, briefly
                        limit = min(limit, answered_at + 0.5)
        reason = None
        if done_at is not None and kind == "sluice":
            stream.read_until(b"\n\n", done_at + 5)  # the whole done frame
            frame = stream.buf[stream.buf.index(b"event: done") :]
            reason = json.loads(frame.split(b"data: ", 1)[1].split(b"\n", 1)[0])["reason"]
    finally:
        stream.close()
        if dconn is not None:
            dconn.close()
    record = sim.record(tag, timeout=5 if done_at is not None else 0.5)
    ended = record.get("ended")
    upstream_ms = (ended - sent) * 1000 if ended and done_at is not None else None
    return {
        "where": where,
        "same_worker": dpid == owner,
        "status": status,
        "delete_status": body.get("status") or body.get("error"),
        "reason": reason,
        "done_ms": (done_at - sent) * 1000 if done_at is not None else None,
        "upstream_ms": upstream_ms,
        "answer_ms": (answered_at - sent) * 1000 if answered_at is not None else None,
        "upstream_state": record["state"],
    }


def summarize(results: list[dict]) -> dict:
    done = [r["done_ms"] for r in results if r["done_ms"] is not None]
    upstream = [r["upstream_ms"] for r in results if r["upstream_ms"] is not None]
    answer = [r["answer_ms"] for r in results if r["answer_ms"] is not None and r["status"] == 200]
    return {
        "tries": len(results),
        "landed_on_owner": sum(r["same_worker"] for r in results),
        "cancelled_200": sum(r["status"] == 200 for r in results),
        "not_found_404": sum(r["status"] == 404 for r in results),
        "stopped": len(done),
        "done_p50": pct(done, 50),
        "done_p99": pct(done, 99),
        "upstream_p50": pct(upstream, 50),
        "upstream_p99": pct(upstream, 99),
        "answer_p50": pct(answer, 50),
        "answer_p99": pct(answer, 99),
    }


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:.1f}"  # NaN: nothing to measure


def run(quick: bool = False, tries: int | None = None, kinds=("sluice", "common")) -> dict:
    tries = tries or (30 if quick else 200)
    common_tries = 10 if quick else 50
    data: dict[str, dict] = {}
    rows = []
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", "50", "--delay", "0")
        baseline = [close_try(sim, None, CHATTY, True) for _ in range(tries)]
        ms = [r["ms"] for r in baseline if r["ms"] is not None]
        data["baseline"] = {"tries": len(baseline), "p50": pct(ms, 50), "p99": pct(ms, 99)}
        rows.append(
            ["direct (baseline): the client closes the upstream itself", "–", len(baseline)]
            + ["–"] * 4
            + [_fmt(pct(ms, 50)), _fmt(pct(ms, 99)), "–", "–", ""]
        )
        if "sluice" in kinds:
            a = stack.sluice(redis_server, sim)
            b = stack.sluice(redis_server, sim)
            one_try("sluice", a, b, sim, "same worker")  # warm-up
            for where in ("same worker", "other worker", "other server"):
                results = [one_try("sluice", a, b, sim, where) for _ in range(tries)]
                data[f"sluice / {where}"] = s = summarize(results)
                data[f"sluice / {where}"]["reasons"] = sorted({r["reason"] for r in results})
                rows.append(_row("Sluice", where, s, where != "same worker"))
            stack.release(b)
            stack.release(a)
            wait_sim_idle(sim, 10)
        if "common" in kinds:
            c = stack.common(sim)
            one_try("common", c, c, sim, "same worker")  # warm-up
            for where in ("whichever accepts", "random worker", "other worker"):
                results = [one_try("common", c, c, sim, where) for _ in range(common_tries)]
                data[f"common / {where}"] = s = summarize(results)
                rows.append(_row("common design", where, s, False))
                wait_sim_idle(sim, 10)
    table = md_table(
        [
            "design",
            "DELETE lands on",
            "tries",
            "landed on the stream's worker",
            "200 cancelled",
            "404 not found",
            "stream stopped",
            "DELETE → upstream closed p50 ms",
            "p99 ms",
            "DELETE → done p50 / p99 ms",
            "DELETE answered p50 / p99 ms",
            f"target p99 ≤ {TARGET_MS:.0f} ms",
        ],
        rows,
    )
    markdown = (
        "### Cancel latency (2 servers × 2 gevent workers, one Redis; chatty upstream "
        f"sim:rate=50)\n\n{table}"
    )
    return {"markdown": markdown, "data": data}


def _row(design: str, where: str, s: dict, target: bool) -> list:
    verdict = ""
    if target:
        worst = max(s["done_p99"], s["upstream_p99"])
        met = worst <= TARGET_MS and s["stopped"] == s["tries"]
        verdict = "met" if met else "MISSED"
    return [
        design,
        where,
        s["tries"],
        s["landed_on_owner"],
        s["cancelled_200"],
        s["not_found_404"],
        f"{s['stopped']}/{s['tries']}",
        _fmt(s["upstream_p50"]),
        _fmt(s["upstream_p99"]),
        f"{_fmt(s['done_p50'])} / {_fmt(s['done_p99'])}",
        f"{_fmt(s['answer_p50'])} / {_fmt(s['answer_p99'])}",
        verdict,
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tries", type=int)
    parser.add_argument("--sluice-only", action="store_true")
    parser.add_argument("--write", action="store_true", help="append to bench/HISTORY.md")
    args = parser.parse_args()
    kinds = ("sluice",) if args.sluice_only else ("sluice", "common")
    result = run(args.quick, args.tries, kinds)
    print(result["markdown"])
    if args.write:
        append_results("cancel", result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
