"""In-process: the /v1 surface's request checks, the pass-through rule and the error shape.

Streams and answers through the official SDK and LangChain are the gunicorn
tier's (tests/test_openai_compat.py, tests/test_openai_tools.py). Here: what is
refused before a generation starts, in OpenAI's error shape, and how OpenAI's
body is split (`parse_openai`) into what Sluice owns (model, messages, stream,
stream_options, the token caps, temperature) and the fields forwarded
unchanged (every other one, ``n`` only when 1).
"""

from __future__ import annotations

import pytest

from streaming.core.sessions import SessionStore
from streaming.web.errors import ApiError
from streaming.web.openai_request import OWNED, parse_openai

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
         "invalid_request", "messages.0.tool_call_id"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "function", "content": "x"}]},
         "invalid_request", "messages.0.role"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": None}]},
         "invalid_request", "messages.0.content"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 5}]},
         "invalid_request", "messages.0.content"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"text": "x"}]}]},
         "invalid_request", "messages.0.content.0"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x",
          "tool_calls": []}]}, "invalid_request", "messages.0.tool_calls"),
        ({"model": "gpt-4o-mini", "messages": ["hi"]}, "invalid_request", "messages.0"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"type": "text",
          "text": "x" * 32_001}]}]}, "invalid_request", "messages"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "n": 2}, "invalid_request", "n"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "n": "1"}, "invalid_request", "n"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "tools": {"a": 1}}, "invalid_request",
         "tools"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "tool_choice": 3}, "invalid_request",
         "tool_choice"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "stop": [1]}, "invalid_request",
         "stop"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "response_format": "json"},
         "invalid_request", "response_format"),
        ({"model": 7, "messages": user("hi")}, "invalid_request", "model"),
        ({"model": "gpt-4o-mini", "messages": user("x" * 32_001)}, "invalid_request", "messages"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "stream": "yes"}, "invalid_request",
         "stream"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "stream_options": "yes"},
         "invalid_request", "stream_options"),
        ({"model": "gpt-4o-mini", "messages": user("hi"),
          "stream_options": {"include_usage": "yes"}}, "invalid_request", "stream_options"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "max_completion_tokens": 0},
         "invalid_request", "max_completion_tokens"),
        ({"model": "gpt-4o-mini", "messages": user("hi"), "max_tokens": True}, "invalid_request",
         "max_tokens"),
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
    too_long = app_client.post(
        CHAT, json={"messages": user("hi")}, headers={"X-Session-ID": "se_" + "0" * 70}
    )
    assert too_long.status_code == 400
    assert openai_error(too_long)["param"] == "session_id"


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


# -- the pass-through rule ---------------------------------------------------------------


def parse(body: dict):
    return parse_openai(
        body, allowed_models=("gpt-4o-mini", "gpt-4o"), default_model="gpt-4o-mini", max_chars=100
    )


def test_what_sluice_owns():
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
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    }  # fmt: skip
    req = parse(body)
    assert (req.stream, req.include_usage, req.model) == (True, True, "gpt-4o")
    assert req.messages == body["messages"]  # forwarded as given, parts and all
    assert (req.max_tokens, req.max_completion_tokens, req.temperature) == (10, 7, 0.5)
    assert req.stream_options == {"include_obfuscation": False}  # include_usage is Sluice's
    assert req.params == {}
    assert set(body) == OWNED


def test_defaults():
    req = parse({"messages": user("hi"), "stream": None})
    assert (req.stream, req.include_usage, req.model) == (False, False, "gpt-4o-mini")
    assert req.max_tokens is req.max_completion_tokens is req.temperature is None


def test_every_other_field_is_forwarded_unchanged():
    extra = {
        "n": 1,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
        "stop": ["x", "y"],
        "seed": 1,
        "user": "u",
        "top_p": 0.5,
        "presence_penalty": 0.1,
        "frequency_penalty": -0.2,
        "logit_bias": {"50256": -100},
        "logprobs": True,
        "top_logprobs": 3,
        "reasoning_effort": "low",
        "metadata": {"k": "v"},
        "store": False,
        "a_field_openai_adds_later": {"nested": [1, 2]},
    }
    assert parse({"messages": user("hi"), **extra}).params == extra


def test_every_role_and_content_shape_is_accepted_and_kept():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png", "detail": "low"}}
    messages = [
        {"role": "developer", "content": "rules"},
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        {"role": "user", "content": [{"type": "text", "text": "look"}, image], "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
        {"role": "assistant", "content": None, "refusal": "no"},
        {"role": "user", "content": "thanks"},
    ]
    assert parse({"messages": messages}).messages == messages


def test_max_prompt_chars_counts_the_text():
    image = {"type": "image_url", "image_url": {"url": "http://x/" + "y" * 500}}
    text = {"type": "text", "text": "x" * 60}
    assert parse({"messages": [{"role": "user", "content": [text, image]}]})
    with pytest.raises(ApiError) as info:
        parse({"messages": [{"role": "user", "content": [text, text]}]})
    assert (info.value.status, info.value.code) == (400, "invalid_request")
    assert "'messages': more than 100 characters" in str(info.value)
