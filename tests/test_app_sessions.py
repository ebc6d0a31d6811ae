"""In-process: chat sessions CRUD (API §7) on the real redis-server.

Turns saved by generations are the gunicorn tier's (tests/test_sessions.py) and
the unit tier's (tests/test_unit_generation.py); here: the routes themselves.
"""

from __future__ import annotations

import json
import time

import pytest

from streaming.core import keys
from streaming.core.sessions import SessionStore
from tests.app_tier import error_of

pytestmark = [pytest.mark.app, pytest.mark.timeout(30)]

SESSIONS = "/api/v1/sessions"


def test_create_get_delete(app_client):
    before = int(time.time())
    response = app_client.post(SESSIONS)
    created = response.get_json()
    assert response.status_code == 201 and created["title"] == "New chat"
    assert set(created) == {"session_id", "title", "created"}
    assert created["session_id"].startswith("se_") and len(created["session_id"]) == 35
    assert before <= created["created"] <= int(time.time())
    titled = app_client.post(SESSIONS, json={"title": "Trip plans"}).get_json()
    assert titled["title"] == "Trip plans" and titled["session_id"] != created["session_id"]
    got = app_client.get(f"{SESSIONS}/{titled['session_id']}")
    assert got.status_code == 200 and got.get_json() == {**titled, "messages": []}
    deleted = app_client.delete(f"{SESSIONS}/{titled['session_id']}")
    assert deleted.status_code == 204 and deleted.data == b""
    assert error_of(app_client.get(f"{SESSIONS}/{titled['session_id']}")) == (404, "not_found")
    assert error_of(app_client.delete(f"{SESSIONS}/{titled['session_id']}")) == (404, "not_found")
    assert app_client.get(f"{SESSIONS}/{created['session_id']}").status_code == 200


@pytest.mark.parametrize(
    ("body", "title"),
    [({}, "New chat"), ({"title": "   "}, "New chat"), ({"title": "  x  "}, "x"),
     ({"title": "é" * 200}, "é" * 200), ({"other": 1}, "New chat")],
)  # fmt: skip
def test_titles(app_client, body, title):
    response = app_client.post(SESSIONS, json=body)
    assert response.status_code == 201 and response.get_json()["title"] == title


@pytest.mark.parametrize(
    ("raw", "ctype", "status", "code"),
    [
        (b'{"title": 5}', "application/json", 400, "invalid_request"),
        (b'{"title": null}', "application/json", 400, "invalid_request"),
        (b'{"title": "' + b"x" * 201 + b'"}', "application/json", 400, "invalid_request"),
        (b"[1]", "application/json", 400, "invalid_request"),
        (b"{nope", "application/json", 400, "invalid_json"),
        (b'{"title": "x"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"title": "' + b"x" * 300_000 + b'"}', "application/json", 413, "payload_too_large"),
    ],
)
def test_bad_session_bodies(app_client, app_redis, raw, ctype, status, code):
    response = app_client.post(SESSIONS, data=raw, headers={"Content-Type": ctype})
    assert error_of(response) == (status, code)
    assert not list(app_redis.scan_iter("sluice:session*"))


@pytest.mark.parametrize(
    "session_id", ["se_" + "0" * 32, "nope", "se_" + "Z" * 32, "se_" + "0" * 33]
)
def test_unknown_and_malformed_ids_are_404(app_client, session_id):
    assert error_of(app_client.get(f"{SESSIONS}/{session_id}")) == (404, "not_found")
    assert error_of(app_client.delete(f"{SESSIONS}/{session_id}")) == (404, "not_found")


def test_sessions_live_in_redis_with_their_ttl(make_app, app_redis):
    client = make_app(SESSION_TTL_SECONDS="120").test_client()
    session_id = client.post(SESSIONS, json={"title": "kept"}).get_json()["session_id"]
    assert 0 < app_redis.ttl(keys.session(session_id)) <= 120
    # another app on the same Redis (another worker, or after a restart) sees it
    other = make_app(SESSION_TTL_SECONDS="120", HEARTBEAT_SECONDS="2").test_client()
    assert other.get(f"{SESSIONS}/{session_id}").get_json()["title"] == "kept"
    app_redis.delete(keys.session(session_id))  # expired
    assert error_of(other.get(f"{SESSIONS}/{session_id}")) == (404, "not_found")


def test_saved_turns_are_returned_in_order(app_client, app_redis):
    """Turns as a generation's final pipeline writes them (SessionStore.save_turn)."""
    session_id = app_client.post(SESSIONS).get_json()["session_id"]
    store = SessionStore(app_redis, ttl=600, max_messages=4)
    for n in range(3):
        pipe = app_redis.pipeline()
        new = [{"role": "user", "content": f"q{n}"}]
        store.save_turn(pipe, session_id, new, f"a{n}", interrupted=n == 2)
        pipe.execute()
    messages = app_client.get(f"{SESSIONS}/{session_id}").get_json()["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]  # oldest dropped first past max_messages
    assert [m.get("interrupted") for m in messages] == [None, None, None, True]
    assert all(isinstance(m["created"], int) for m in messages)
    raw = app_redis.lrange(keys.session(session_id, ":messages"), 0, -1)
    assert [json.loads(m)["content"] for m in raw] == ["q1", "a1", "q2", "a2"]
    assert app_client.delete(f"{SESSIONS}/{session_id}").status_code == 204
    assert not list(app_redis.scan_iter(keys.session(session_id) + "*"))
