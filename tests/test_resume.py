"""Attach, resume and detached starts, across workers and across two servers on one Redis."""

from __future__ import annotations

import psutil
import pytest

from devtools.harness import wait_for
from streaming.core import keys
from streaming.redis_conn import MAX_CONNECTIONS
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

STREAM = "/api/v1/completions/stream"


@pytest.fixture(scope="module")
def pair(make_sluice):
    """Two separate gunicorn servers (2 workers each) sharing one Redis; grace 5 s."""
    return (
        make_sluice(workers=2, DISCONNECT_GRACE_SECONDS="5"),
        make_sluice(workers=2, DISCONNECT_GRACE_SECONDS="5"),
    )


def text_of(events) -> str:
    return "".join(e["data"]["token"] for e in events if e["event"] == "token")


def full_text(base: str, prompt: str) -> str:
    return text_of(EventStream(base, STREAM, {"prompt": prompt}).read_all())


def test_drop_on_a_and_resume_on_b_gets_every_event_exactly_once(pair, simulator, tag):
    a, b = pair
    prompt = f"resume sim:tokens=120 sim:rate=60 sim:tag={tag}"
    stream = EventStream(a.base, STREAM, {"prompt": prompt})
    for _ in range(6):
        stream.next_event()
    seen = list(stream.events)
    stream.close()  # the tab drops; the generation keeps going within the grace window
    last = int(seen[-1]["id"])
    resumed = EventStream(
        b.base, f"{STREAM}/{stream.stream_id}", method="GET", headers={"Last-Event-ID": str(last)}
    )
    assert resumed.status == 200 and resumed.headers["content-type"] == "text/event-stream"
    rest = resumed.read_all()
    events = seen + rest
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["data"]["reason"] == "stop"
    assert simulator.record(tag)["state"] == "completed"  # the upstream was never cut
    assert len(text_of(events).split(" ")) > 100


def test_resumed_text_equals_an_uninterrupted_run(pair):
    a, b = pair
    prompt = "same text sim:tokens=80 sim:rate=80"
    expected = full_text(a.base, prompt)
    stream = EventStream(a.base, STREAM, {"prompt": prompt})
    stream.until("token")
    stream.next_event()
    stream.close()
    last = stream.events[-1]["id"]
    rest = EventStream(
        b.base, f"{STREAM}/{stream.stream_id}?last_event_id={last}", method="GET"
    ).read_all()
    assert text_of(stream.events + rest) == expected


def test_a_second_follower_on_another_server_sees_the_same_events(pair):
    a, b = pair
    first = EventStream(a.base, STREAM, {"prompt": "two readers sim:tokens=60 sim:rate=60"})
    first.until("token")
    second = EventStream(b.base, f"{STREAM}/{first.stream_id}", method="GET")
    one, two = first.read_all(), second.read_all()
    assert [(e["id"], e["data"]) for e in one] == [(e["id"], e["data"]) for e in two]


def test_finished_stream_replays_then_expires_into_404(pair, redis_client):
    a, b = pair
    done = EventStream(a.base, STREAM, {"prompt": "replay sim:tokens=10"})
    original = done.read_all()
    replay = EventStream(b.base, f"{STREAM}/{done.stream_id}", method="GET").read_all()
    assert [(e["id"], e["data"]) for e in replay] == [(e["id"], e["data"]) for e in original]
    tail = EventStream(
        b.base,
        f"{STREAM}/{done.stream_id}",
        method="GET",
        headers={"Last-Event-ID": original[-3]["id"]},
    ).read_all()
    assert [e["id"] for e in tail] == [e["id"] for e in original[-2:]]
    redis_client.delete(keys.registry(done.stream_id), keys.events(done.stream_id))
    assert request(b.base, "GET", f"{STREAM}/{done.stream_id}")[0] == 404


@pytest.mark.parametrize("bad", ["abc", "-1", "1e3", "99999999999"])
def test_bad_last_event_id_is_400(pair, bad):
    a, _ = pair
    done = EventStream(a.base, STREAM, {"prompt": "x sim:tokens=2"})
    done.read_all()
    status, _, out = request(
        a.base, "GET", f"{STREAM}/{done.stream_id}", headers={"Last-Event-ID": bad}
    )
    assert (status, out["error"]["code"]) == (400, "invalid_request")


def test_start_on_a_cancel_on_b(pair, simulator, tag):
    a, b = pair
    stream = EventStream(a.base, STREAM, {"prompt": f"x sim:tokens=9999 sim:rate=30 sim:tag={tag}"})
    stream.until("token")
    status, _, out = request(b.base, "DELETE", f"{STREAM}/{stream.stream_id}")
    assert (status, out["status"]) == (200, "cancelled")
    assert simulator.record(tag, timeout=0.5)["state"] == "client_closed"
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"


def test_detached_start_then_attach(pair):
    a, b = pair
    status, _, out = request(
        a.base, "POST", "/api/v1/completions", {"prompt": "detached sim:tokens=30 sim:rate=60"}
    )
    assert status == 202 and out["stream_url"] == f"{STREAM}/{out['stream_id']}"
    events = EventStream(b.base, out["stream_url"], method="GET").read_all()
    assert events[0]["event"] == "start" and events[-1]["data"]["reason"] == "stop"
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))


def test_detached_start_nobody_attaches_is_cancelled_after_grace(
    make_sluice, simulator, tag, redis_client
):
    server = make_sluice(workers=2, DISCONNECT_GRACE_SECONDS="1")
    status, _, out = request(
        server.base,
        "POST",
        "/api/v1/completions",
        {"prompt": f"alone sim:tokens=9999 sim:rate=20 sim:tag={tag}"},
    )
    assert status == 202
    record = simulator.record(tag, timeout=10)
    assert record["state"] == "client_closed"
    # the upstream is closed first in the generation's `finally`; the registry is marked after
    key = keys.registry(out["stream_id"])
    entry = wait_for(
        lambda: (e := redis_client.hgetall(key)).get(b"state") == b"finished" and e,
        5,
        "the registry entry marked finished",
    )
    assert entry[b"reason"] == b"cancelled"


def test_grace_expiry_saves_the_turn_as_interrupted(make_sluice, simulator, tag):
    server = make_sluice(workers=2, DISCONNECT_GRACE_SECONDS="1")
    sid = request(server.base, "POST", "/api/v1/sessions")[2]["session_id"]
    stream = EventStream(
        server.base,
        STREAM,
        {"prompt": f"x sim:tokens=9999 sim:rate=30 sim:tag={tag}", "session_id": sid},
    )
    stream.until("token")
    stream.close()
    assert simulator.record(tag, timeout=10)["state"] == "client_closed"
    from devtools.harness import wait_for

    def saved():
        messages = request(server.base, "GET", f"/api/v1/sessions/{sid}")[2]["messages"]
        return messages if len(messages) == 2 else None

    messages = wait_for(saved, 5, "turn saved")
    assert messages[1]["interrupted"] is True and messages[1]["content"]


def redis_connections(server, redis_port: int) -> dict[int, int]:
    """Open TCP connections to Redis held by each worker of `server`."""
    counts = {}
    for pid in server.worker_pids():
        conns = psutil.Process(pid).net_connections(kind="tcp")
        counts[pid] = sum(1 for c in conns if c.raddr and c.raddr.port == redis_port)
    return counts


@pytest.mark.timeout(180)
def test_a_reconnect_storm_costs_no_redis_connection_per_follower(pair, redis_server):
    """Regression (issue 14): each remote follower held a pooled connection for its XREAD,
    so a worker answered 503 (MaxConnectionsError) past its pool; now one reader per worker."""
    a, b = pair
    count = 200  # more than a worker's whole pool (MAX_CONNECTIONS)
    started = []
    for i in range(count):
        status, _, out = request(
            a.base,
            "POST",
            "/api/v1/completions",
            {"prompt": f"storm {i} sim:tokens=60 sim:rate=20"},
        )
        assert status == 202
        started.append(out["stream_id"])
    followers = [
        EventStream(
            b.base, f"{STREAM}/{sid}", method="GET", headers={"Last-Event-ID": "0"}, timeout=60
        )
        for sid in started
    ]
    assert [f.status for f in followers] == [200] * count
    held = redis_connections(b, redis_server.port)  # every follower attached, streams live
    print("redis connections per worker of B:", held)
    assert max(held.values()) <= MAX_CONNECTIONS, held
    assert sum(held.values()) < count, held
    for follower in followers:
        events = follower.read_all()
        assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["data"]["reason"] == "stop"
        assert events[-1]["data"]["metadata"]["token_count"] == 60


def test_a_get_for_a_stream_already_read_to_done_is_204(pair):
    """A browser EventSource reconnecting after `done` is told to stop (HTTP 204)."""
    a, b = pair
    events = EventStream(a.base, STREAM, {"prompt": "seen sim:tokens=5"}).read_all()
    done_id = events[-1]["id"]
    path = f"{STREAM}/{events[0]['data']['stream_id']}"
    for server in (a, b):
        status, _, body = request(server.base, "GET", path, headers={"Last-Event-ID": done_id})
        assert (status, body) == (204, {})
    before = EventStream(
        b.base, path, method="GET", headers={"Last-Event-ID": str(int(done_id) - 1)}
    )
    assert [e["event"] for e in before.read_all()] == ["done"]
