"""A client that goes away: the upstream request is closed (grace 0 here, or after the window)."""

from __future__ import annotations

import time

import pytest

from devtools.harness import wait_for
from streaming.core import keys
from tests.sse_client import EventStream

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PATH = "/api/v1/completions/stream"


def _registry_reason(redis_client, stream_id):
    return redis_client.hget(keys.registry(stream_id), "reason")


@pytest.mark.parametrize(
    "directives",
    [
        "sim:tokens=5000 sim:rate=50",  # chatty upstream
        "sim:delay=60",  # silent before the first token
        "sim:tokens=50 sim:stall_after=2 sim:stall=60",  # silent mid-stream
    ],
    ids=["chatty", "silent-first-token", "silent-mid-stream"],
)
def test_client_gone_closes_the_upstream(sluice, simulator, redis_client, tag, directives):
    stream = EventStream(sluice.base, PATH, {"prompt": f"x {directives} sim:tag={tag}"})
    assert stream.next_event()["event"] == "start"
    simulator.record(tag, wait="seen")
    closed_at = time.monotonic()
    stream.close()
    record = simulator.record(tag, timeout=5)
    assert record["state"] == "client_closed", record
    assert time.monotonic() - closed_at < 2.0
    wait_for(
        lambda: _registry_reason(redis_client, stream.stream_id) == b"cancelled",
        5,
        "registry entry finished",
    )


def test_grace_window_keeps_the_upstream_then_closes_it(make_sluice, simulator, tag):
    server = make_sluice(workers=1, DISCONNECT_GRACE_SECONDS="1.5")
    stream = EventStream(
        server.base, PATH, {"prompt": f"x sim:tokens=5000 sim:rate=50 sim:tag={tag}"}
    )
    stream.until("token")
    closed_at = time.monotonic()
    stream.close()
    assert simulator.record(tag, timeout=0.5)["state"] == "open"  # still generating in the window
    record = simulator.record(tag, timeout=5)
    assert record["state"] == "client_closed"
    assert 1.2 < time.monotonic() - closed_at < 3.5
