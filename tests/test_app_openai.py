"""In-process: the /v1 surface's request translation, validation and error shape.

Streams and answers through the official SDK are the gunicorn tier's
(tests/test_openai_compat.py). Here: what is refused before a generation
starts, in OpenAI's error shape, and how OpenAI's body becomes ours
(`openai_request`), as the code does it today: ``max_completion_tokens`` wins,
text-part arrays are joined, ``X-Session-ID`` names the session, and every
other field (``n`` included) is left out.
"""

from __future__ import annotations

import pytest

from streaming.core.sessions import SessionStore
from streaming.web.openai_compat import openai_request

pytestmark = [pytest.mark.app, pytest.mark.timeout(30)]

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def openai_error(response) -> dict:
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"model": "gpt-5-secret", "messages": user("hi")}, "model_not_allowed", "model"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "temperature": 5}, "invalid_request",
         "temperature"),
        ({"model": "gpt-4o-mini", "messages": []}, "invalid_request", "messages"),
        ({"model": "gpt-4o-mini"}, "invalid_request", "messages"),
        ({"model": "gpt-4o-mini", "messages": "hi"}, "invalid_request", "messages"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "tool", "content": "x"}]},
         "invalid_request", "messages.0.role"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "image_url",
          "image_url": {"url": "http://x/y.png"}}]}]}, "invalid_request", "messages.0.content"),
        ({"model": "gpt-4o-mini", "messages": user("x" * 32_001)}, "invalid_request", "messages"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "stream": "yes"}, "invalid_request",
         "stream"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "stream_options": "yes"},
         "invalid_request", "stream_options"),
        ({"model": "gpt-4o-mini", "messages": user("hi"),
          "stream_options": {"include_usage": "yes"}}, "invalid_request", "stream_options"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "max_completion_tokens": 0},
         "invalid_request", "max_tokens"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "max_tokens": "5"}, "invalid_request",
         "max_tokens"),
    ],
)  # fmt: skip
def test_bad_requests_are_openai_bad_request_errors(app_client, app_redis, body, code, param):
    response = app_client.post(CHAT, json=body)
    assert response.status_code == 400
    error = openai_error(response)
    assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error")
    assert not list(app_redis.scan_iter("sluice:stream:*"))


def test_the_model_defaults_to_llm_model(make_app):
    client = make_app(ALLOWED_MODELS="gpt-4o", LLM_MODEL="gpt-4o").test_client()
    error = openai_error(client.post(CHAT, json={"model": "gpt-4o-mini", "messages": user("hi")}))
    assert error["code"] == "model_not_allowed" and "'gpt-4o-mini'" in error["message"]
    # no model: LLM_MODEL, allowed, so validation goes on to the next problem
    error = openai_error(client.post(CHAT, json={"messages": user("hi"), "temperature": 9}))
    assert (error["code"], error["param"]) == ("invalid_request", "temperature")


@pytest.mark.parametrize(
    ("status", "code", "headers", "raw"),
    [
        (415, "unsupported_media_type", {"Content-Type": "text/plain"}, b"{}"),
        (400, "invalid_json", JSON, b"{nope"),
        (400, "invalid_request", JSON, b"[1]"),
        (413, "payload_too_large", JSON, b'{"x": "' + b"a" * 300_000 + b'"}'),
    ],
)
def test_http_level_errors_have_the_openai_shape(app_client, status, code, headers, raw):
    response = app_client.post(CHAT, data=raw, headers=headers)
    assert response.status_code == status
    error = openai_error(response)
    assert (error["code"], error["type"], error["param"]) == (code, "invalid_request_error", None)


def test_429_has_the_openai_shape(make_app):
    client = make_app(RATE_LIMIT_DEFAULT="1/minute").test_client()
    assert client.get("/v1/models").status_code == 200
    response = client.get("/v1/models")
    assert response.status_code == 429 and int(response.headers["Retry-After"]) > 0
    error = openai_error(response)
    assert (error["code"], error["type"]) == ("rate_limited", "rate_limit_error")


def test_a_session_already_generating_is_409_in_openai_shape(app_client, app_redis):
    session_id = app_client.post("/api/v1/sessions").get_json()["session_id"]
    app_redis.set(SessionStore.live_key(session_id), "st_" + "1" * 32, ex=60)
    response = app_client.post(
        CHAT, json={"messages": user("hi")}, headers={"X-Session-ID": session_id}
    )
    assert response.status_code == 409
    assert openai_error(response)["code"] == "session_busy"
    unknown = app_client.post(
        CHAT, json={"messages": user("hi")}, headers={"X-Session-ID": "se_" + "0" * 32}
    )
    assert unknown.status_code == 404 and openai_error(unknown)["code"] == "not_found"


def test_models(make_app):
    client = make_app(ALLOWED_MODELS="gpt-4o-mini,gpt-4o").test_client()
    listed = client.get("/v1/models").get_json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["gpt-4o-mini", "gpt-4o"]
    assert all(m["object"] == "model" and m["owned_by"] == "sluice" for m in listed["data"])
    assert client.get("/v1/models/gpt-4o").get_json()["id"] == "gpt-4o"
    missing = client.get("/v1/models/gpt-5-secret")
    assert missing.status_code == 404 and openai_error(missing)["code"] == "not_found"
    only_default = make_app(ALLOWED_MODELS="", LLM_MODEL="gpt-4o").test_client()
    assert [m["id"] for m in only_default.get("/v1/models").get_json()["data"]] == ["gpt-4o"]


# -- the translation, as today -----------------------------------------------------------


def translate(app_client, body: dict, headers: dict | None = None):
    with app_client.application.test_request_context(CHAT, headers=headers or {}):
        return openai_request(body)


def test_translation_keeps_what_sluice_uses(app_client):
    body = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a "},
                                         {"type": "text", "text": "b"}]},
        ],
        "max_tokens": 10,
        "max_completion_tokens": 7,
        "temperature": 0.5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    ours, stream, include_usage = translate(app_client, body, {"X-Session-ID": "se_x"})
    assert (stream, include_usage) == (True, True)
    assert ours == {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a b"},
        ],
        "model": "gpt-4o",
        "max_tokens": 7,  # max_completion_tokens wins
        "temperature": 0.5,
        "session_id": "se_x",
    }


def test_translation_defaults(app_client):
    ours, stream, include_usage = translate(app_client, {"messages": user("hi"), "max_tokens": 3})
    assert (stream, include_usage) == (False, False)
    assert ours["max_tokens"] == 3 and ours["model"] is None and ours["session_id"] is None
    ours, stream, _ = translate(app_client, {"messages": user("hi"), "stream": None})
    assert stream is False


def test_other_fields_are_left_out_today(app_client):
    """Today's docs/API.md: other fields are ignored. `n` too (no 400, no forwarding)."""
    extra = {
        "n": 2,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "auto",
        "stop": ["x"],
        "seed": 1,
        "user": "u",
        "top_p": 0.5,
        "response_format": {"type": "json_object"},
    }
    ours, _, _ = translate(app_client, {"messages": user("hi"), **extra})
    assert set(ours) == {"messages", "model", "max_tokens", "temperature", "session_id"}


def test_mixed_content_parts_are_left_to_validation(app_client):
    parts = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}]
    ours, _, _ = translate(app_client, {"messages": [{"role": "user", "content": parts}]})
    assert ours["messages"][0]["content"] == parts  # not joined: validation refuses it
