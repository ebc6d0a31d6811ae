"""In-process: authenticated mode (API_KEYS): 401 with WWW-Authenticate, 404 for not-owned.

Streams owned by a key are the gunicorn tier's (tests/test_auth.py); here the
routes that answer before a generation starts, sessions, and registry entries
written the way the manager writes them.
"""

from __future__ import annotations

import pytest

from streaming.core import keys
from tests.app_tier import error_of

pytestmark = [pytest.mark.app, pytest.mark.timeout(30)]

STREAM = "/api/v1/completions/stream"
SESSIONS = "/api/v1/sessions"
K1 = {"Authorization": "Bearer key-one"}
K2 = {"Authorization": "Bearer key-two"}
MISSING = "st_" + "0" * 32


@pytest.fixture()
def authed(make_app):
    return make_app(API_KEYS="key-one,key-two").test_client()


BAD_CREDENTIALS = [
    {},
    {"Authorization": "Bearer nope"},
    {"Authorization": "key-one"},
    {"Authorization": "Basic a2V5LW9uZQ=="},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer key-one,key-two"},
    {"Authorization": "Bearer key-on"},
]
ROUTES = [
    ("POST", STREAM, {"prompt": "x"}),
    ("POST", "/api/v1/completions", {"prompt": "x"}),
    ("GET", f"{STREAM}/{MISSING}", None),
    ("DELETE", f"{STREAM}/{MISSING}", None),
    ("POST", SESSIONS, None),
    ("GET", SESSIONS, None),
    ("GET", f"{SESSIONS}/se_{'0' * 32}", None),
    ("DELETE", f"{SESSIONS}/se_{'0' * 32}", None),
]


@pytest.mark.parametrize(
    "headers",
    BAD_CREDENTIALS,
    ids=["none", "wrong", "no-scheme", "basic", "empty", "both", "prefix"],
)
def test_without_a_valid_key_401(authed, app_redis, headers):
    for method, path, body in ROUTES:
        response = authed.open(path, method=method, json=body, headers=headers)
        assert error_of(response) == (401, "unauthorized"), (method, path)
        assert response.headers["WWW-Authenticate"] == "Bearer"
    assert authed.get("/health").status_code == 200
    assert authed.get("/ready").status_code == 200
    assert not list(app_redis.scan_iter("sluice:session*"))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}])
def test_v1_without_a_valid_key_401_in_openai_shape(authed, headers):
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models")]:
        response = authed.open(path, method=method, json={"messages": []}, headers=headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        error = response.get_json()["error"]
        assert (error["code"], error["type"]) == ("unauthorized", "authentication_error")


def test_the_scheme_is_case_insensitive(authed):
    response = authed.post(SESSIONS, headers={"Authorization": "bearer key-one"})
    assert response.status_code == 201


def test_open_mode_ignores_authorization(app_client):
    response = app_client.post(SESSIONS, headers={"Authorization": "Bearer whatever"})
    session_id = response.get_json()["session_id"]
    assert app_client.get(f"{SESSIONS}/{session_id}").status_code == 200  # no header: same owner


def test_sessions_belong_to_their_key(authed, app_redis):
    mine = authed.post(SESSIONS, json={"title": "one's"}, headers=K1).get_json()["session_id"]
    theirs = authed.post(SESSIONS, json={"title": "two's"}, headers=K2).get_json()["session_id"]
    unknown = "se_" + "0" * 32
    for method in ("GET", "DELETE"):
        other = authed.open(f"{SESSIONS}/{mine}", method=method, headers=K2)
        missing = authed.open(f"{SESSIONS}/{unknown}", method=method, headers=K2)
        assert error_of(other) == error_of(missing) == (404, "not_found")
        assert other.get_json() == missing.get_json()  # not owned = does not exist
    # another key cannot write into it either: 404 before anything starts
    response = authed.post(STREAM, json={"prompt": "x", "session_id": mine}, headers=K2)
    assert error_of(response) == (404, "not_found")
    assert not list(app_redis.scan_iter("sluice:stream:*"))
    # listing: each key sees its own, newest first
    listed = authed.get(SESSIONS, headers=K1).get_json()["sessions"]
    assert [s["session_id"] for s in listed] == [mine]
    second = authed.post(SESSIONS, headers=K1).get_json()["session_id"]
    listed = authed.get(SESSIONS, headers=K1).get_json()["sessions"]
    assert {s["session_id"] for s in listed} == {mine, second}
    assert [s["session_id"] for s in authed.get(SESSIONS, headers=K2).get_json()["sessions"]] == [
        theirs
    ]
    assert authed.get(f"{SESSIONS}/{mine}", headers=K1).get_json()["title"] == "one's"
    assert authed.delete(f"{SESSIONS}/{mine}", headers=K1).status_code == 204
    assert [s["session_id"] for s in authed.get(SESSIONS, headers=K1).get_json()["sessions"]] == [
        second
    ]


def test_keys_are_never_stored(authed, app_redis):
    session_id = authed.post(SESSIONS, headers=K1).get_json()["session_id"]
    owner = app_redis.hget(keys.session(session_id), "owner").decode()
    assert owner.startswith("key:") and "key-one" not in owner
    for key in app_redis.scan_iter("*"):
        assert b"key-one" not in key
        if app_redis.type(key) == b"hash":
            assert all(b"key-one" not in v for v in app_redis.hvals(key))


@pytest.mark.parametrize("state", ["running", "finished"])
def test_streams_of_another_owner_are_404_like_unknown_ones(authed, app_redis, state):
    """A registry entry owned by someone else, as the registry writes it (streaming.core)."""
    stream_id = "st_" + "5" * 32
    entry = {"owner": "key:someone-else", "state": state, "worker": "w", "events": "3"}
    app_redis.hset(keys.registry(stream_id), mapping=entry)
    for method in ("GET", "DELETE"):
        other = authed.open(f"{STREAM}/{stream_id}", method=method, headers=K1)
        missing = authed.open(f"{STREAM}/{MISSING}", method=method, headers=K1)
        assert error_of(other) == error_of(missing) == (404, "not_found")
        assert other.get_json() == missing.get_json()
    assert app_redis.hget(keys.registry(stream_id), "state").decode() == state
    assert not app_redis.exists(keys.cancel_flag(stream_id))  # no cancel was attempted
