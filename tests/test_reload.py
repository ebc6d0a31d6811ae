"""SIGHUP to the gunicorn master (what `systemctl reload` sends) while streams run.

gunicorn starts new workers and gracefully stops the old ones: each old worker
lets its streams run for GRACEFUL_TIMEOUT - 3 s, then ends the rest with an
`interrupted` error; the master and its listening socket stay.
"""

from __future__ import annotations

import signal

import pytest

from devtools.harness import wait_for
from streaming.core import keys
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PATH = "/api/v1/completions/stream"


def owner_pid(redis_client, stream_id: str) -> int:
    worker = redis_client.hget(keys.registry(stream_id), "worker").decode()
    return int(worker.split(":")[1])


def test_sighup_replaces_the_workers_without_losing_a_stream(
    make_sluice, simulator, redis_client, fresh_limits, tag
):
    # graceful_timeout 5 s: streams get 5 - 3 (margin) = 2 s, then `interrupted`
    server = make_sluice(workers=2, GRACEFUL_TIMEOUT="5")
    status, _, session = request(server.base, "POST", "/api/v1/sessions", {"title": "reload"})
    assert status == 201
    session_id = session["session_id"]

    long_prompt = f"long sim:tokens=9999 sim:rate=20 sim:tag={tag}-l"
    long = EventStream(server.base, PATH, {"prompt": long_prompt, "session_id": session_id})
    short = EventStream(
        server.base, PATH, {"prompt": f"x sim:tokens=20 sim:rate=20 sim:tag={tag}-s"}
    )
    long.until("token")
    short.until("token")
    old_workers = set(server.worker_pids())
    assert len(old_workers) == 2
    server.signal(signal.SIGHUP)

    # a stream that fits in the graceful window finishes normally
    short_events = short.read_all()
    assert short_events[-1]["data"]["reason"] == "stop"
    assert simulator.record(f"{tag}-s")["state"] == "completed"

    # a longer one is interrupted, properly ended, and its upstream request closed
    long_events = long.read_all()
    assert [e["event"] for e in long_events][-2:] == ["error", "done"]
    assert long_events[-2]["data"]["error"]["code"] == "interrupted"
    assert long_events[-1]["data"]["reason"] == "error"
    assert simulator.record(f"{tag}-l", timeout=2)["state"] == "client_closed"

    # the master stays; two new workers replace the old ones
    def new_workers() -> set[int]:
        pids = set(server.worker_pids())
        return pids if len(pids) == 2 and not pids & old_workers else set()

    wait_for(new_workers, 15, "the old workers replaced by new ones")
    assert server.proc.poll() is None

    # the partial answer was saved in the session, marked interrupted
    def saved_turn() -> list[dict]:
        status, _, body = request(server.base, "GET", f"/api/v1/sessions/{session_id}")
        assert status == 200, body
        return body["messages"] if len(body["messages"]) == 2 else []

    user, reply = wait_for(saved_turn, 5, "the interrupted turn in the session")
    assert (user["role"], user["content"]) == ("user", long_prompt)
    assert reply["role"] == "assistant"
    assert reply["interrupted"] is True
    relayed = "".join(e["data"]["token"] for e in long_events if e["event"] == "token")
    assert relayed and reply["content"] == relayed

    # the new workers serve new streams, on the same session too (its live lease is free)
    after = EventStream(
        server.base, PATH, {"prompt": "again sim:tokens=3", "session_id": session_id}
    )
    assert after.status == 200
    assert after.read_all()[-1]["data"]["reason"] == "stop"
    assert owner_pid(redis_client, after.stream_id) not in old_workers

    # no concurrency slot is left taken
    wait_for(lambda: not list(redis_client.scan_iter("sluice:slots:*")), 5, "all slots released")


def test_a_reload_ends_the_doctors_probe_streams_at_once(make_sluice):
    """A probe stream is no generation: a reload ends it at once with `interrupted` (no
    `done`), instead of holding the old worker for its idle period (GRACEFUL_TIMEOUT)."""
    server = make_sluice(workers=2, GRACEFUL_TIMEOUT="60")
    probes = EventStream(server.base, "/api/v1/diagnostics/stream?idle=120", method="GET")
    assert probes.status == 200
    probes.until("probe")
    old_workers = set(server.worker_pids())
    server.signal(signal.SIGHUP)
    events = probes.read_all()  # within the test's timeout: far less than 60 s
    assert events[-1]["event"] == "error"
    assert events[-1]["data"]["error"]["code"] == "interrupted"
    assert "done" not in [e["event"] for e in events]

    def old_workers_gone() -> bool:
        return not set(server.worker_pids()) & old_workers

    wait_for(old_workers_gone, 15, "the old workers gone, not held for their graceful timeout")
