"""SIGTERM to the gunicorn master while streams run."""

from __future__ import annotations

import signal

import pytest

from streaming.core import keys
from tests.sse_client import EventStream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PATH = "/api/v1/completions/stream"


def test_sigterm_lets_short_streams_finish_and_interrupts_long_ones(
    make_sluice, simulator, redis_client, tag
):
    # graceful_timeout 5 s: streams get 5 - 3 (margin) = 2 s, then `interrupted`
    server = make_sluice(workers=2, GRACEFUL_TIMEOUT="5")
    long = EventStream(
        server.base, PATH, {"prompt": f"x sim:tokens=9999 sim:rate=20 sim:tag={tag}-l"}
    )
    short = EventStream(
        server.base, PATH, {"prompt": f"x sim:tokens=20 sim:rate=20 sim:tag={tag}-s"}
    )
    long.until("token")
    short.until("token")
    server.signal(signal.SIGTERM)

    short_events = short.read_all()
    assert short_events[-1]["data"]["reason"] == "stop"

    long_events = long.read_all()
    names = [e["event"] for e in long_events]
    assert names[-2:] == ["error", "done"]
    assert long_events[-2]["data"]["error"]["code"] == "interrupted"
    assert long_events[-1]["data"]["reason"] == "error"
    assert simulator.record(f"{tag}-l", timeout=2)["state"] == "client_closed"
    entry = redis_client.hgetall(keys.registry(long.stream_id))
    assert entry[b"state"] == b"finished"
    assert server.proc.wait(15) == 0
