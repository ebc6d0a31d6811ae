"""Chat sessions in Redis (real gunicorn, 2 gevent workers)."""

from __future__ import annotations

import signal

import pytest

from devtools.harness import wait_for
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

STREAM = "/api/v1/completions/stream"
SESSIONS = "/api/v1/sessions"


def new_session(base: str, **body) -> str:
    status, _, out = request(base, "POST", SESSIONS, body or None)
    assert status == 201, out
    return out["session_id"]


def chat(base: str, session_id: str, prompt: str) -> list[dict]:
    return EventStream(base, STREAM, {"prompt": prompt, "session_id": session_id}).read_all()


def test_create_get_delete(sluice):
    status, _, created = request(sluice.base, "POST", SESSIONS)
    assert status == 201 and created["title"] == "New chat"
    assert created["session_id"].startswith("se_") and isinstance(created["created"], int)
    status, _, titled = request(sluice.base, "POST", SESSIONS, {"title": "Trip plans"})
    assert titled["title"] == "Trip plans"
    status, _, got = request(sluice.base, "GET", f"{SESSIONS}/{titled['session_id']}")
    assert status == 200 and got == {**titled, "messages": []}
    assert request(sluice.base, "DELETE", f"{SESSIONS}/{titled['session_id']}")[0] == 204
    assert request(sluice.base, "GET", f"{SESSIONS}/{titled['session_id']}")[0] == 404
    assert request(sluice.base, "DELETE", f"{SESSIONS}/{titled['session_id']}")[0] == 404


@pytest.mark.parametrize("body", [{"title": 5}, {"title": "x" * 201}, [1]])
def test_bad_session_bodies(sluice, body):
    status, _, out = request(sluice.base, "POST", SESSIONS, body)
    assert status == 400 and out["error"]["code"] == "invalid_request"


def test_history_goes_upstream_and_turns_are_saved(sluice, simulator, tag):
    sid = new_session(sluice.base)
    first = chat(sluice.base, sid, f"one sim:tokens=5 sim:tag={tag}-1")
    assert first[0]["data"]["session_id"] == sid
    second = chat(sluice.base, sid, f"two sim:tokens=5 sim:tag={tag}-2")
    assert simulator.record(f"{tag}-1")["messages_count"] == 1
    assert simulator.record(f"{tag}-2")["messages_count"] == 3  # history (2) + the new message
    messages = request(sluice.base, "GET", f"{SESSIONS}/{sid}")[2]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == f"one sim:tokens=5 sim:tag={tag}-1"
    reply = "".join(e["data"]["token"] for e in second if e["event"] == "token")
    assert messages[3]["content"] == reply
    assert all("interrupted" not in m for m in messages)


def test_cancelled_and_failed_replies_are_saved_as_interrupted(sluice):
    sid = new_session(sluice.base)
    stream = EventStream(
        sluice.base, STREAM, {"prompt": "long sim:tokens=9999 sim:rate=50", "session_id": sid}
    )
    stream.until("token")
    request(sluice.base, "DELETE", f"{STREAM}/{stream.stream_id}")
    events = stream.read_all()
    partial = "".join(e["data"]["token"] for e in stream.events if e["event"] == "token")
    assert events[-1]["data"]["reason"] == "cancelled"
    chat(sluice.base, sid, "bad sim:fail=500")
    messages = request(sluice.base, "GET", f"{SESSIONS}/{sid}")[2]["messages"]
    assert messages[1] == {**messages[1], "content": partial, "interrupted": True}
    assert partial
    assert messages[3]["interrupted"] is True and messages[3]["content"] == ""


def test_second_concurrent_stream_on_a_session_is_409(sluice):
    sid = new_session(sluice.base)
    live = EventStream(
        sluice.base, STREAM, {"prompt": "long sim:tokens=40 sim:rate=40", "session_id": sid}
    )
    live.until("token")
    status, _, out = request(sluice.base, "POST", STREAM, {"prompt": "again", "session_id": sid})
    assert (status, out["error"]["code"]) == (409, "session_busy")
    assert live.read_all()[-1]["data"]["reason"] == "stop"
    assert chat(sluice.base, sid, "now sim:tokens=2")[-1]["data"]["reason"] == "stop"


def test_unknown_session_is_404_and_stores_nothing(sluice, redis_client):
    before = set(redis_client.scan_iter("sluice:stream:*"))
    for sid in ["se_" + "0" * 32, "nope", "../x"]:
        status, _, out = request(sluice.base, "POST", STREAM, {"prompt": "x", "session_id": sid})
        assert (status, out["error"]["code"]) == (404, "not_found")
    assert set(redis_client.scan_iter("sluice:stream:*")) == before


def test_history_is_trimmed_oldest_first(make_sluice, simulator, tag):
    server = make_sluice(workers=1, SESSION_MAX_MESSAGES="4")
    sid = new_session(server.base)
    for i in range(3):
        chat(server.base, sid, f"turn{i} sim:tokens=2 sim:tag={tag}-{i}")
    messages = request(server.base, "GET", f"{SESSIONS}/{sid}")[2]["messages"]
    assert [m["content"].split()[0] for m in messages if m["role"] == "user"] == ["turn1", "turn2"]
    assert simulator.record(f"{tag}-2")["messages_count"] == 5  # 4 kept + the new one


def test_listing_is_for_authenticated_mode_only(sluice, make_sluice):
    assert request(sluice.base, "GET", SESSIONS)[0] == 404
    server = make_sluice(workers=1, API_KEYS="alpha,beta")
    alpha, beta = {"Authorization": "Bearer alpha"}, {"Authorization": "Bearer beta"}
    mine = request(server.base, "POST", SESSIONS, {"title": "a"}, headers=alpha)[2]["session_id"]
    listed = request(server.base, "GET", SESSIONS, headers=alpha)[2]["sessions"]
    assert [s["session_id"] for s in listed] == [mine]
    assert request(server.base, "GET", SESSIONS, headers=beta)[2]["sessions"] == []
    assert request(server.base, "GET", f"{SESSIONS}/{mine}", headers=beta)[0] == 404
    assert request(server.base, "DELETE", f"{SESSIONS}/{mine}", headers=beta)[0] == 404
    status, _, out = request(
        server.base, "POST", STREAM, {"prompt": "x", "session_id": mine}, headers=beta
    )
    assert status == 404


def test_history_survives_two_servers_and_a_restart_of_every_worker(make_sluice):
    a, b = make_sluice(workers=2), make_sluice(workers=2)
    sid = new_session(a.base, title="shared")
    chat(a.base, sid, "from A sim:tokens=3")
    via_b = request(b.base, "GET", f"{SESSIONS}/{sid}")[2]
    assert [m["role"] for m in via_b["messages"]] == ["user", "assistant"]
    chat(b.base, sid, "from B sim:tokens=3")

    old = set(a.worker_pids())
    a.signal(signal.SIGHUP)  # gunicorn replaces every worker
    wait_for(
        lambda: len(set(a.worker_pids()) - old) == 2 and not (set(a.worker_pids()) & old),
        30,
        "new workers",
    )
    wait_for(lambda: request(a.base, "GET", "/health")[0] == 200, 10, "health")
    after = request(a.base, "GET", f"{SESSIONS}/{sid}")[2]
    assert [m["content"].split(" sim:")[0] for m in after["messages"] if m["role"] == "user"] == [
        "from A",
        "from B",
    ]
