"""The /v1 OpenAI-compatible surface, driven by the official openai SDK (real gunicorn, Redis)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from devtools.harness import wait_for
from streaming.core import keys
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CANCEL = "/api/v1/completions/stream"
JSON = {"Content-Type": "application/json"}


@pytest.fixture()
def client(sluice):
    with openai.OpenAI(base_url=sluice.base + "/v1", api_key="x", max_retries=0) as c:
        yield c


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def upstream_text(simulator, prompt: str) -> str:
    """What the simulator answers to this prompt (deterministic), asked directly."""
    with openai.OpenAI(base_url=simulator.v1, api_key="x", max_retries=0) as direct:
        answer = direct.chat.completions.create(model="gpt-4o-mini", messages=user(prompt))
    return answer.choices[0].message.content


def test_non_streaming_completion(client, simulator, tag):
    prompt = f"hello sim:tokens=12 sim:tag={tag}"
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=user(prompt), temperature=0.3
    )
    completion = raw.parse()
    assert raw.status_code == 200 and raw.headers["x-stream-id"] == completion.id
    assert completion.id.startswith("st_") and len(completion.id) == 35
    assert completion.object == "chat.completion" and completion.model == "gpt-4o"
    record = simulator.record(tag)
    assert record["model"] == "gpt-4o" and record["state"] == "completed"
    choice = completion.choices[0]
    assert choice.index == 0 and choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    assert choice.message.content == upstream_text(simulator, prompt)
    usage = completion.usage
    assert usage.completion_tokens == 12 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streaming_with_usage(client, simulator, tag):
    prompt = f"hello sim:tokens=30 sim:tag={tag}"
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini",
        messages=user(prompt),
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        stream_id = response.headers["x-stream-id"]
        chunks = list(response.parse())
    assert {c.id for c in chunks} == {stream_id}
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o-mini" for c in chunks)
    first, finish, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    body = chunks[1:-2]
    assert body and all(c.choices[0].finish_reason is None for c in body)
    assert "".join(c.choices[0].delta.content for c in body) == upstream_text(simulator, prompt)
    assert finish.choices[0].finish_reason == "stop" and finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == 30
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_usage_and_max_completion_tokens(client):
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=user("x sim:tokens=50"),
            max_completion_tokens=5,
            stream=True,
        )
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_max_tokens_ends_with_length(client):
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=user("x sim:tokens=50"), max_tokens=4
    )
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 4


def test_exact_wire_format_with_heartbeats(sluice):
    # heartbeat is 1 s in this server; the first token comes after 1.5 s
    body = {
        "model": "gpt-4o-mini",
        "messages": user("slow sim:delay=1.5 sim:tokens=3"),
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 1,  # forwarded (only 1 is accepted)
    }
    stream = EventStream(sluice.base, "/v1/chat/completions", body)
    assert stream.status == 200
    text = stream.resp.read().decode()
    stream.close()
    frames = text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert ": ping" in frames[:-2]
    assert text.index(": ping") < text.index('"content":"', text.index('"content":""') + 1)
    events = [json.loads(f[6:]) for f in frames[:-2] if f.startswith("data: ")]
    assert all(f.startswith(("data: ", ": ping")) for f in frames[:-1])
    assert events[0] == {
        "id": stream.stream_id,
        "object": "chat.completion.chunk",
        "created": events[0]["created"],
        "model": "gpt-4o-mini",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        ],
        "usage": None,
    }
    assert events[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 3


def test_async_client_streaming_and_not(sluice, simulator):
    prompt = "async sim:tokens=9"

    async def run() -> tuple[str, str, list[str]]:
        async with openai.AsyncOpenAI(
            base_url=sluice.base + "/v1", api_key="x", max_retries=0
        ) as aclient:
            completion = await aclient.chat.completions.create(
                model="gpt-4o-mini", messages=user(prompt)
            )
            stream = await aclient.chat.completions.create(
                model="gpt-4o-mini", messages=user(prompt), stream=True
            )
            ids, parts = set(), []
            async for chunk in stream:
                ids.add(chunk.id)
                parts.append(chunk.choices[0].delta.content or "")
            assert len(ids) == 1
            return completion.choices[0].message.content, "".join(parts), [completion.id, *ids]

    whole, streamed, ids = asyncio.run(run())
    assert whole == streamed == upstream_text(simulator, prompt)
    assert ids[0] != ids[1]


def test_delete_cancels_a_v1_stream(client, sluice, simulator, tag):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user(f"long sim:tokens=5000 sim:rate=30 sim:tag={tag}"),
        stream=True,
    )
    assert next(stream).choices[0].delta.role == "assistant"
    first = next(stream)
    assert first.choices[0].delta.content
    status, _, body = request(sluice.base, "DELETE", f"{CANCEL}/{first.id}")
    assert (status, body) == (200, {"stream_id": first.id, "status": "cancelled"})
    assert simulator.record(tag, timeout=1)["state"] == "client_closed"
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert info.value.code == "cancelled" and info.value.type == "cancelled"
    assert not isinstance(info.value, openai.APIStatusError)


def test_delete_cancels_a_non_streaming_call_with_499(client, sluice, redis_client, tag):
    session_id = request(sluice.base, "POST", "/api/v1/sessions", {})[2]["session_id"]
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(
            client.chat.completions.create,
            model="gpt-4o-mini",
            messages=user(f"long sim:tokens=5000 sim:rate=30 sim:tag={tag}"),
            extra_headers={"X-Session-ID": session_id},
        )
        live = wait_for(lambda: redis_client.get(keys.session(session_id, ":live")))
        stream_id = live.decode()
        status, _, body = request(sluice.base, "DELETE", f"{CANCEL}/{stream_id}")
        assert (status, body["status"]) == (200, "cancelled")
        with pytest.raises(openai.APIStatusError) as info:
            call.result(timeout=10)
    error = info.value
    assert (error.status_code, error.code, error.type) == (499, "cancelled", "cancelled")
    assert error.response.headers["x-stream-id"] == stream_id
    stored = request(sluice.base, "GET", f"/api/v1/sessions/{session_id}")[2]["messages"]
    assert stored[-1]["role"] == "assistant" and stored[-1]["interrupted"] is True


def test_sdk_closing_the_stream_cancels_the_upstream(client, simulator, tag):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=user(f"long sim:tokens=5000 sim:rate=30 sim:tag={tag}"),
        stream=True,
    )
    assert next(stream).choices[0].delta.role == "assistant"  # sent before the upstream call
    assert next(stream).choices[0].delta.content  # the upstream is relaying
    stream.close()
    assert simulator.record(tag, timeout=5)["state"] == "client_closed"


def test_non_streaming_client_timeout_cancels_the_upstream(sluice, simulator, tag):
    with openai.OpenAI(
        base_url=sluice.base + "/v1", api_key="x", max_retries=0, timeout=1.0
    ) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.chat.completions.create(
                model="gpt-4o-mini",
                messages=user(f"long sim:tokens=5000 sim:rate=30 sim:tag={tag}"),
            )
    assert simulator.record(tag, timeout=5)["state"] == "client_closed"


@pytest.mark.parametrize(
    ("directive", "exc_type", "status", "code"),
    [
        ("sim:fail=429", openai.RateLimitError, 429, "upstream_rate_limited"),
        ("sim:fail=500", openai.InternalServerError, 502, "upstream_error"),
        ("sim:tokens=50 sim:close_after=5", openai.InternalServerError, 502, "upstream_error"),
    ],
)
def test_upstream_failures_non_streaming(client, directive, exc_type, status, code):
    with pytest.raises(exc_type) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=user(f"x {directive}"))
    error = info.value
    assert (error.status_code, error.code) == (status, code)
    assert error.type == ("rate_limit_error" if status == 429 else "server_error")
    assert error.response.headers["x-stream-id"].startswith("st_")
    assert error.body["message"]


def test_upstream_timeout_non_streaming_is_504(client):
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gpt-4o-mini", messages=user("x sim:hang=10"))
    assert (info.value.status_code, info.value.code) == (504, "upstream_timeout")


def test_upstream_failure_mid_stream_raises_in_the_sdk(client):
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=user("x sim:tokens=50 sim:close_after=5"), stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert info.value.code == "upstream_error" and info.value.type == "server_error"
    assert "".join(received)  # the part that did arrive


@pytest.mark.parametrize(
    ("kwargs", "code", "param"),
    [
        ({"model": "gpt-5-secret"}, "model_not_allowed", "model"),
        ({"temperature": 5}, "invalid_request", "temperature"),
        ({"messages": []}, "invalid_request", "messages"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "invalid_request",
            "messages.0.tool_call_id",
        ),
        (
            {"messages": [{"role": "function", "content": "x"}]},
            "invalid_request",
            "messages.0.role",
        ),
        ({"n": 2}, "invalid_request", "n"),
        ({"messages": user("x" * 32_001)}, "invalid_request", "messages"),
        ({"extra_body": {"stream": "yes"}}, "invalid_request", "stream"),
    ],
)
def test_bad_requests_are_bad_request_errors(client, kwargs, code, param):
    args = {"model": "gpt-4o-mini", "messages": user("hi"), **kwargs}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**args)
    error = info.value
    assert (error.status_code, error.code, error.param) == (400, code, param)
    assert error.type == "invalid_request_error" and error.body["message"]


def test_text_part_arrays_are_accepted(client):
    parts = [{"type": "text", "text": "hi "}, {"type": "text", "text": "sim:tokens=2"}]
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": parts}]
    )
    assert completion.usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("status", "code", "headers", "raw"),
    [
        (415, "unsupported_media_type", {"Content-Type": "text/plain"}, b"{}"),
        (400, "invalid_json", JSON, b"{nope"),
        (413, "payload_too_large", JSON, b'{"x": "' + b"a" * 300_000 + b'"}'),
    ],
)
def test_http_level_errors_have_the_openai_shape(sluice, status, code, headers, raw):
    got, out_headers, body = request(
        sluice.base, "POST", "/v1/chat/completions", headers=headers, raw=raw
    )
    assert got == status and out_headers["content-type"] == "application/json"
    assert body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_models(client):
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "gpt-4o"]
    assert client.models.retrieve("gpt-4o").owned_by == "sluice"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-5-secret")
    assert info.value.code == "not_found"


def test_session_header_sends_history_and_stores_the_turn(client, sluice, simulator, tag):
    session_id = request(sluice.base, "POST", "/api/v1/sessions", {"title": "sdk"})[2]["session_id"]
    headers = {"X-Session-ID": session_id}
    first = client.chat.completions.create(
        model="gpt-4o-mini", messages=user("one sim:tokens=3"), extra_headers=headers
    )
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=user(f"two sim:tokens=4 sim:tag={tag}"),
            stream=True,
            extra_headers=headers,
        )
    )
    assert simulator.record(tag)["messages_count"] == 3  # history (2) + the new message
    stored = request(sluice.base, "GET", f"/api/v1/sessions/{session_id}")[2]["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["content"] == first.choices[0].message.content
    assert stored[3]["content"] == "".join(c.choices[0].delta.content or "" for c in chunks)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=user("x"),
            extra_headers={"X-Session-ID": "se_" + "0" * 32},
        )


def test_authenticated_mode(make_sluice, simulator):
    server = make_sluice(workers=1, API_KEYS="key-a,key-b")
    base = server.base + "/v1"
    with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as info:
            stranger.models.list()
    assert info.value.code == "unauthorized" and info.value.type == "authentication_error"
    with openai.OpenAI(base_url=base, api_key="key-a", max_retries=0) as alice:
        stream = alice.chat.completions.create(
            model="gpt-4o-mini", messages=user("long sim:tokens=5000 sim:rate=30"), stream=True
        )
        stream_id = next(stream).id
        bob = {"Authorization": "Bearer key-b"}
        assert request(server.base, "DELETE", f"{CANCEL}/{stream_id}", headers=bob)[0] == 404
        mine = {"Authorization": "Bearer key-a"}
        assert request(server.base, "DELETE", f"{CANCEL}/{stream_id}", headers=mine)[0] == 200
        with pytest.raises(openai.APIError):
            list(stream)


def test_rate_limits_and_concurrency(make_sluice, fresh_limits, redis_client):
    server = make_sluice(workers=2, RATE_LIMIT_STREAM="3/minute", MAX_CONCURRENT_STREAMS="1")
    with openai.OpenAI(base_url=server.base + "/v1", api_key="x", max_retries=0) as c:
        stream = c.chat.completions.create(
            model="gpt-4o-mini", messages=user("long sim:tokens=5000 sim:rate=30"), stream=True
        )
        next(stream)
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="gpt-4o-mini", messages=user("x"))
        assert info.value.code == "too_many_streams"
        assert int(info.value.response.headers["retry-after"]) >= 1
        stream.close()
        wait_for(lambda: not redis_client.zcard(keys.slots("127.0.0.1")), what="slot release")
        c.chat.completions.create(model="gpt-4o-mini", messages=user("x sim:tokens=1"))
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="gpt-4o-mini", messages=user("x"))
        assert info.value.code == "rate_limited" and info.value.type == "rate_limit_error"
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert [m.id for m in c.models.list()]  # the default budget is separate
