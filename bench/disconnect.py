"""Client disconnect -> upstream closed: from the client closing its socket to the simulator's
record ``ended`` (both ``time.time()`` on this machine).

Sluice runs with ``DISCONNECT_GRACE_SECONDS=0`` (reported with the figures),
2 gevent workers. Two upstreams:

- chatty: ``sim:rate=50`` (a token every 20 ms; the stream is closed after
  its first token);
- silent: ``sim:delay=60`` (nothing after the response head; closed once the
  simulator has seen the request), where only a watch on the client socket
  can notice the client leaving.

Baseline in the same run: the same client talking straight to the simulator
and closing its socket (the simulator's own EOF detection, the floor).
Target: <= grace + 100 ms. The common design (bench/common_design.py) is
tried a few times too, waiting at most 2 s for its upstream to close.

    python -m bench.disconnect [--quick] [--tries N] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import time

from bench.client import Conn, direct_request, post_request
from bench.stack import Stack, append_results, md_table, pct, wait_sim_idle

__all__ = ["close_try", "run"]

GRACE = "0"
COMMON_WAIT = 2.0
MODES = {
    "chatty (sim:rate=50)": "sim:tokens=3000 sim:rate=50 sim:delay=0",
    "silent (sim:delay=60)": "sim:tokens=5 sim:delay=60",
}
_tags = itertools.count()


def close_try(
    sim, port: int | None, directives: str, chatty: bool, kind: str = "sluice", wait: float = 5
) -> dict:
    """One stream (through Sluice on `port`, or straight to the simulator if None), closed by
    the client; returns the close -> upstream-ended time."""
    tag = f"disc-{time.time_ns()}-{next(_tags)}"
    prompt = f"disconnect {directives} sim:tag={tag}"
    deadline = time.time() + 10
    if port is None:
        conn = Conn(sim_port(sim))
        conn.send(direct_request(sim_port(sim), prompt))
        token = b'"delta":{"content":'
    else:
        conn = Conn(port)
        conn.send(post_request(port, prompt))
        token = b"event: token" if kind == "sluice" else b'"type": "token"'
        if kind == "common" and not chatty:  # its head comes with the upstream's
            token = b'"type": "start"'
            chatty = True
    try:
        assert conn.read_head(deadline) == 200, conn.head
        if chatty:
            conn.read_until(token, deadline)
        else:
            sim.record(tag, wait="seen", timeout=5)
    finally:
        closed_at = time.time()
        conn.close()
    record = sim.record(tag, timeout=wait)
    ended = record.get("ended")
    return {
        "ms": (ended - closed_at) * 1000 if ended else None,
        "state": record["state"],
    }


def sim_port(sim) -> int:
    return int(sim.base.rsplit(":", 1)[1])


def summarize(results: list[dict]) -> dict:
    ms = [r["ms"] for r in results if r["ms"] is not None]
    closed = sum(r["state"] == "client_closed" for r in results)
    return {"tries": len(results), "closed": closed, "p50": pct(ms, 50), "p99": pct(ms, 99)}


def _fmt(value: float) -> str:
    return "–" if value != value else f"{value:.1f}"  # NaN: nothing closed


def run(quick: bool = False, tries: int | None = None) -> dict:
    tries = tries or (20 if quick else 100)
    common_tries = 5 if quick else 10
    grace = float(GRACE)
    rows, data = [], {}
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", "50", "--delay", "0")
        server = stack.sluice(redis_server, sim, DISCONNECT_GRACE_SECONDS=GRACE)
        common = stack.common(sim)
        targets = [
            ("direct (baseline)", None, "direct", tries, 5.0),
            ("Sluice", server.port, "sluice", tries, 5.0),
            # the common design notices a client only when a write fails, and its SDK stream
            # is freed by the garbage collector (a reference cycle): wait 2 s at most
            ("common design", common.port, "common", common_tries, COMMON_WAIT),
        ]
        for name, directives in MODES.items():
            chatty = name.startswith("chatty")
            for label, port, kind, n, wait in targets:
                if kind != "common":
                    close_try(sim, port, directives, chatty, kind)  # warm-up
                results = [close_try(sim, port, directives, chatty, kind, wait) for _ in range(n)]
                s = summarize(results)
                data[f"{name} / {label}"] = s
                target = grace * 1000 + 100
                verdict = ""
                if kind == "sluice":
                    met = s["p99"] <= target and s["closed"] == s["tries"]
                    verdict = f"≤ {target:.0f} ms: {'met' if met else 'MISSED'}"
                rows.append(
                    [
                        name,
                        label,
                        s["tries"],
                        f"{s['closed']}/{s['tries']} (within {wait:g} s)",
                        _fmt(s["p50"]),
                        _fmt(s["p99"]),
                        verdict,
                    ]
                )
            wait_sim_idle(sim, 5)
    table = md_table(
        [
            "upstream",
            "client talks to",
            "tries",
            "upstream closed",
            "close → upstream closed p50 ms",
            "p99 ms",
            "target (p99)",
        ],
        rows,
    )
    markdown = (
        f"### Disconnect → upstream closed (DISCONNECT_GRACE_SECONDS={GRACE}, 2 gevent "
        f"workers)\n\n{table}"
    )
    return {"markdown": markdown, "data": data, "grace": grace}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tries", type=int)
    parser.add_argument("--write", action="store_true", help="append to bench/HISTORY.md")
    args = parser.parse_args()
    result = run(args.quick, args.tries)
    print(result["markdown"])
    if args.write:
        append_results("disconnect", result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
