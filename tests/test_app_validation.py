"""In-process: request validation and the §3 error shape, before anything is started.

`create_app(settings).test_client()` on the session's real redis-server (see
tests/app_tier.py). Every request here is refused before the upstream would be
called; the gunicorn tier (tests/test_errors.py) runs the same contract over HTTP.
"""

from __future__ import annotations

import pytest

from streaming.core import keys
from streaming.core.sessions import SessionStore
from tests.app_tier import error_of, free_port

pytestmark = [pytest.mark.app, pytest.mark.timeout(30)]

STREAM = "/api/v1/completions/stream"
DETACHED = "/api/v1/completions"
JSON = "application/json"
MISSING_STREAM = f"{STREAM}/st_{'0' * 32}"

CASES = [
    ("not json", b"{nope", JSON, 400, "invalid_json"),
    ("bad utf-8", b'{"prompt": "\xff"}', JSON, 400, "invalid_json"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, JSON, 400, "invalid_json"),
    ("text/plain", b'{"prompt": "hi"}', "text/plain", 415, "unsupported_media_type"),
    ("no content type", b'{"prompt": "hi"}', None, 415, "unsupported_media_type"),
    ("array body", b"[1, 2]", JSON, 400, "invalid_request"),
    ("neither prompt nor messages", b"{}", JSON, 400, "invalid_request"),
    ("both", b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', JSON, 400,
     "invalid_request"),
    ("prompt not a string", b'{"prompt": 5}', JSON, 400, "invalid_request"),
    ("empty prompt", b'{"prompt": "  "}', JSON, 400, "invalid_request"),
    ("bad role", b'{"messages": [{"role": "god", "content": "b"}]}', JSON, 400,
     "invalid_request"),
    ("tool role", b'{"messages": [{"role": "tool", "content": "b"}]}', JSON, 400,
     "invalid_request"),
    ("content an object", b'{"messages": [{"role": "user", "content": {"a": 1}}]}', JSON, 400,
     "invalid_request"),
    ("empty messages", b'{"messages": []}', JSON, 400, "invalid_request"),
    ("max_tokens a string", b'{"prompt": "a", "max_tokens": "5"}', JSON, 400, "invalid_request"),
    ("max_tokens zero", b'{"prompt": "a", "max_tokens": 0}', JSON, 400, "invalid_request"),
    ("max_tokens a float", b'{"prompt": "a", "max_tokens": 5.0}', JSON, 400, "invalid_request"),
    ("max_tokens true", b'{"prompt": "a", "max_tokens": true}', JSON, 400, "invalid_request"),
    ("temperature too high", b'{"prompt": "a", "temperature": 3}', JSON, 400, "invalid_request"),
    ("temperature negative", b'{"prompt": "a", "temperature": -0.1}', JSON, 400,
     "invalid_request"),
    ("session_id not a string", b'{"prompt": "a", "session_id": 1}', JSON, 400,
     "invalid_request"),
    ("model empty", b'{"prompt": "a", "model": ""}', JSON, 400, "invalid_request"),
    ("model not allowed", b'{"prompt": "a", "model": "gpt-5-ultra"}', JSON, 400,
     "model_not_allowed"),
    ("prompt too long", b'{"prompt": "' + b"a" * 32_001 + b'"}', JSON, 400, "invalid_request"),
    ("messages too long", b'{"messages": [{"role": "user", "content": "' + b"a" * 16_001
     + b'"}, {"role": "user", "content": "' + b"a" * 16_000 + b'"}]}', JSON, 400,
     "invalid_request"),
    ("body too large", b'{"prompt": "' + b"a" * 300_000 + b'"}', JSON, 413, "payload_too_large"),
]  # fmt: skip


@pytest.mark.parametrize("path", [STREAM, DETACHED], ids=["stream", "detached"])
@pytest.mark.parametrize(
    ("name", "raw", "ctype", "status", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_typed_error_and_nothing_is_stored(
    app_client, app_redis, path, name, raw, ctype, status, code
):
    headers = {"Content-Type": ctype} if ctype else {}
    response = app_client.post(path, data=raw, headers=headers)
    assert error_of(response) == (status, code)
    assert not list(app_redis.scan_iter("sluice:stream:*"))
    assert not list(app_redis.scan_iter("sluice:slots:*"))


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "a", "temperature": "hot"}, "'temperature"),  # today: 'temperature.float'
        ({"messages": [{"role": "user"}]}, "'messages.0.content'"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "x", "content": "y"}]},
         "'messages.1.role'"),
        ({"prompt": "a", "max_tokens": 131_073}, "'max_tokens'"),
        ({"prompt": "a" * 32_001}, "'prompt'"),
        ({"prompt": "   "}, "'prompt'"),
    ],
)  # fmt: skip
def test_field_errors_name_the_field(app_client, body, field):
    response = app_client.post(STREAM, json=body)
    assert error_of(response) == (400, "invalid_request")
    assert field in response.get_json()["error"]["message"]


def test_the_prompt_limit_counts_characters_of_every_message(make_app):
    client = make_app(MAX_PROMPT_CHARS="10").test_client()
    two = [{"role": "system", "content": "a" * 6}, {"role": "user", "content": "b" * 5}]
    assert error_of(client.post(STREAM, json={"messages": two})) == (400, "invalid_request")
    response = client.post(STREAM, json={"prompt": "x" * 11})
    assert "more than 10 characters" in response.get_json()["error"]["message"]


def test_model_not_allowed_names_the_model(make_app):
    client = make_app(ALLOWED_MODELS="", LLM_MODEL="gpt-4o-mini").test_client()
    response = client.post(STREAM, json={"prompt": "a", "model": "gpt-4o"})
    assert error_of(response) == (400, "model_not_allowed")
    assert "'gpt-4o'" in response.get_json()["error"]["message"]
    long_name = "m" * 200
    message = client.post(STREAM, json={"prompt": "a", "model": long_name}).get_json()
    assert long_name not in message["error"]["message"]  # never echoed at length


def test_max_body_bytes_is_the_setting(make_app):
    client = make_app(MAX_BODY_BYTES="2048").test_client()
    assert error_of(client.post(STREAM, json={"prompt": "a" * 3000})) == (413, "payload_too_large")
    assert error_of(client.post(STREAM, json={"prompt": "a", "max_tokens": 0}))[0] == 400


def test_unknown_session_is_404_before_anything_starts(app_client, app_redis):
    for session_id in ("se_" + "0" * 32, "garbage", "se_" + "g" * 32):
        response = app_client.post(STREAM, json={"prompt": "a", "session_id": session_id})
        assert error_of(response) == (404, "not_found")
    assert not list(app_redis.scan_iter("sluice:stream:*"))


def test_a_session_already_generating_is_409(app_client, app_redis):
    session_id = app_client.post("/api/v1/sessions").get_json()["session_id"]
    app_redis.set(SessionStore.live_key(session_id), "st_" + "1" * 32, ex=60)
    for path in (STREAM, DETACHED):
        response = app_client.post(path, json={"prompt": "a", "session_id": session_id})
        assert error_of(response) == (409, "session_busy")
    assert not list(app_redis.scan_iter("sluice:stream:*"))
    assert not list(app_redis.scan_iter("sluice:slots:*"))


def test_no_free_slot_is_429_too_many_streams(make_app, app_redis):
    client = make_app(MAX_CONCURRENT_STREAMS="2").test_client()
    held = {"st_" + "1" * 32: 2e10, "st_" + "2" * 32: 2e10}  # leases far in the future
    app_redis.zadd(keys.slots("127.0.0.1"), held)
    response = client.post(STREAM, json={"prompt": "a"})
    assert error_of(response) == (429, "too_many_streams")
    assert "2" in response.get_json()["error"]["message"]
    assert set(app_redis.zrange(keys.slots("127.0.0.1"), 0, -1)) == {k.encode() for k in held}
    assert not list(app_redis.scan_iter("sluice:stream:*"))


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("PUT", STREAM, 405, "method_not_allowed"),
        ("GET", STREAM, 405, "method_not_allowed"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("PATCH", "/api/v1/sessions", 405, "method_not_allowed"),
        ("GET", MISSING_STREAM, 404, "not_found"),
        ("DELETE", MISSING_STREAM, 404, "not_found"),
        ("GET", f"{STREAM}/garbage", 404, "not_found"),
        ("DELETE", f"{STREAM}/garbage", 404, "not_found"),
        ("DELETE", f"{STREAM}/st_{'G' * 32}", 404, "not_found"),
        ("GET", "/api/v1/sessions", 404, "not_found"),  # listing: authenticated mode only
    ],
)
def test_routes_answer_json_errors(app_client, method, path, status, code):
    response = app_client.open(path, method=method)
    assert error_of(response) == (status, code)
    if status == 405:
        assert response.headers["Allow"]


@pytest.mark.parametrize("bad", ["abc", "-1", "1e3", "99999999999", "٣"])
def test_a_bad_last_event_id_is_400(app_client, app_redis, bad):
    stream_id = "st_" + "3" * 32
    app_redis.hset(keys.registry(stream_id), mapping={"owner": "public", "state": "finished"})
    for kwargs in ({"headers": {"Last-Event-ID": bad}}, {"query_string": {"last_event_id": bad}}):
        response = app_client.get(f"{STREAM}/{stream_id}", **kwargs)
        assert error_of(response) == (400, "invalid_request")
        assert "Last-Event-ID" in response.get_json()["error"]["message"]


def test_finished_streams_answer_without_a_worker(app_client, app_redis):
    """A finished registry entry: DELETE says finished, a GET past its `done` is a 204."""
    stream_id = "st_" + "4" * 32
    entry = {"owner": "public", "state": "finished", "reason": "stop", "events": "7"}
    app_redis.hset(keys.registry(stream_id), mapping=entry)
    response = app_client.delete(f"{STREAM}/{stream_id}")
    assert response.status_code == 200
    assert response.get_json() == {"stream_id": stream_id, "status": "finished"}
    for last in ("7", "8"):
        response = app_client.get(f"{STREAM}/{stream_id}", headers={"Last-Event-ID": last})
        assert response.status_code == 204 and response.data == b""


def test_rate_limit_is_429_with_retry_after(make_app):
    client = make_app(RATE_LIMIT_DEFAULT="2/minute").test_client()
    assert [client.get(MISSING_STREAM).status_code for _ in range(2)] == [404, 404]
    response = client.get(MISSING_STREAM)
    assert error_of(response) == (429, "rate_limited")
    assert 0 < int(response.headers["Retry-After"]) <= 60
    assert response.headers["X-RateLimit-Limit"] == "2"
    # one budget for every /api and /v1 route; the operations routes are never limited
    assert error_of(client.post("/api/v1/sessions"))[1] == "rate_limited"
    assert client.get("/v1/models").status_code == 429
    assert client.get("/health").status_code == 200


def test_starting_a_stream_has_its_own_budget(make_app):
    client = make_app(RATE_LIMIT_STREAM="1/minute").test_client()
    # the start counts before the body is read: a refused start is a start
    assert error_of(client.post(STREAM, json={"prompt": "a", "max_tokens": 0}))[0] == 400
    response = client.post(STREAM, json={"prompt": "a", "max_tokens": 0})
    assert error_of(response) == (429, "rate_limited")
    assert int(response.headers["Retry-After"]) > 0
    assert error_of(client.post(DETACHED, json={"prompt": "a"}))[1] == "rate_limited"
    assert client.get(MISSING_STREAM).status_code == 404  # other routes: the default budget


def test_health_ready_page_and_metrics(app_client):
    assert app_client.get("/health").get_json() == {"status": "ok"}
    assert app_client.get("/ready").status_code == 200
    page = app_client.get("/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    page.close()
    metrics = app_client.get("/metrics")
    assert metrics.status_code == 200 and metrics.mimetype == "text/plain"


def test_redis_unreachable_is_503_and_health_stays_up(make_app):
    client = make_app(redis_url=f"redis://127.0.0.1:{free_port()}/0").test_client()
    assert client.get("/health").status_code == 200
    assert error_of(client.get("/ready")) == (503, "redis_unavailable")
    assert error_of(client.post(STREAM, json={"prompt": "hi"})) == (503, "redis_unavailable")
    assert error_of(client.delete(MISSING_STREAM)) == (503, "redis_unavailable")
    assert error_of(client.post("/api/v1/sessions")) == (503, "redis_unavailable")
    assert client.get("/health").status_code == 200
