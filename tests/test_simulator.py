"""Tests for devtools.simulator, driven through the real openai SDK against a subprocess."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from devtools.simulator import tokens_for

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 40
_tags = itertools.count()


def start_simulator(*args: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "devtools.simulator", "--port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("simulator listening on http://127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1])


def stop_simulator(proc: subprocess.Popen[str], sig: int) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(10)
    finally:
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    proc, port = start_simulator("--tokens", str(TOKENS), "--rate", "0", "--delay", "0")
    try:
        yield port
    finally:
        assert stop_simulator(proc, signal.SIGTERM) == 0


@pytest.fixture(scope="module")
def client(port: int) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0
    ) as client:
        yield client


def new_tag() -> str:
    return f"t{next(_tags)}-{time.monotonic_ns()}"


def sim_get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def record(port: int, tag: str, wait: str = "ended", timeout: float = 5) -> dict[str, Any]:
    status, body = sim_get(port, f"/_sim/requests/{tag}?wait={wait}&timeout={timeout}")
    assert status == 200, body
    return body


def stream(client: openai.OpenAI, prompt: str, **kw: Any) -> list[Any]:
    messages = [{"role": "user", "content": prompt}]
    create = client.chat.completions.create
    return list(create(model="sim-fast", messages=messages, stream=True, **kw))


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_streaming_tokens_finish_and_usage(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    chunks = stream(client, f"hello there sim:tag={tag}", stream_options={"include_usage": True})
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(c.id == chunks[0].id and c.model == "sim-fast" for c in chunks)
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert len(content) == TOKENS and all(content)
    assert "".join(content) == "".join(tokens_for("hello there", TOKENS))
    assert [c.choices[0].finish_reason for c in chunks[:-2]] == [None] * (TOKENS + 1)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == TOKENS
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + TOKENS
    rec = record(port, tag)
    assert rec["state"] == "completed"
    assert rec["chunks_sent"] == TOKENS + 4 and rec["tokens_sent"] == TOKENS
    assert rec["model"] == "sim-fast" and rec["messages_count"] == 1 and rec["max_tokens"] is None
    assert rec["ended"] >= rec["started"]


def test_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = stream(client, "no usage please")
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_non_streaming_matches_stream(client: openai.OpenAI) -> None:
    prompt = "the same prompt sim:tokens=20"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]
    result = client.chat.completions.create(model="gpt-4o", messages=messages)
    assert result.object == "chat.completion" and result.model == "gpt-4o"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens == 20
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
    assert text_of(chunks) == result.choices[0].message.content


def test_list_content_parts_and_timing_directives(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    content = [
        {"type": "text", "text": "hello"},
        {"type": "text", "text": f"sim:tokens=4 sim:rate=20 sim:delay=0.2 sim:tag={tag}"},
    ]
    messages = [{"role": "user", "content": content}]
    result = client.chat.completions.create(model="gpt-4o", messages=messages)
    assert result.choices[0].message.content == "".join(tokens_for("hello", 4))
    rec = record(port, tag)
    assert rec["state"] == "completed" and rec["tokens_sent"] == 4
    assert rec["ended"] - rec["started"] >= 0.35  # delay 0.2 + 4 tokens at 20/s


def test_max_tokens_gives_length(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    chunks = stream(client, f"long answer sim:tag={tag}", max_tokens=5)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 5
    assert chunks[-1].choices[0].finish_reason == "length"
    assert record(port, tag)["max_tokens"] == 5
    messages = [{"role": "user", "content": "long answer"}]
    result = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, max_completion_tokens=3
    )
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 3


def test_fail_429_rate_limit(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    with pytest.raises(openai.RateLimitError) as info:
        stream(client, f"hi sim:fail=429 sim:retry_after=3 sim:tag={tag}")
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "3"
    assert info.value.code == "rate_limit_exceeded"
    assert record(port, tag)["state"] == "failed"


def test_fail_500_and_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        stream(client, "hi sim:fail=500")
    assert info.value.status_code == 500
    messages = [{"role": "user", "content": "hi sim:fail=503"}]
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="gpt-4o", messages=messages)
    assert info.value.status_code == 503
    with pytest.raises(openai.AuthenticationError):
        stream(client, "hi sim:fail=401")


def test_deterministic_text_with_newlines_and_non_ascii(client: openai.OpenAI) -> None:
    first = text_of(stream(client, "tell me a story sim:tokens=64"))
    assert first == text_of(stream(client, "tell me a story sim:tokens=64"))
    assert first != text_of(stream(client, "tell me another story sim:tokens=64"))
    chunks = stream(client, "tell me a story sim:tokens=64")
    assert "\n" in [c.choices[0].delta.content for c in chunks if c.choices]
    assert first.count("\n") == 4
    assert any(not word.isascii() for word in first.split())


def test_close_after_breaks_the_stream(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    received = []
    with pytest.raises((openai.APIConnectionError, httpx2.RemoteProtocolError)):
        for chunk in client.chat.completions.create(
            model="sim-fast",
            messages=[{"role": "user", "content": f"hi sim:close_after=3 sim:tag={tag}"}],
            stream=True,
        ):
            received.append(chunk)
    assert len(received) == 4  # role chunk + 3 content chunks
    rec = record(port, tag)
    assert rec["state"] == "aborted" and rec["tokens_sent"] == 3


def test_truncate_after_ends_without_finish(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    chunks = stream(client, f"hi sim:truncate_after=4 sim:tag={tag}")
    assert len(chunks) == 5
    assert all(c.choices[0].finish_reason is None for c in chunks)
    assert record(port, tag)["state"] == "aborted"
    assert len(stream(client, "the connection is still usable")) == TOKENS + 2


def test_malformed_after_then_continues(port: int) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x sim:malformed_after=2"}]}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    with httpx2.stream("POST", url, json=body | {"stream": True}) as resp:
        assert resp.headers["content-type"] == "text/event-stream"
        assert resp.headers["transfer-encoding"] == "chunked"
        events = [line for line in resp.iter_lines() if line]
    assert events[3] == "data: {not json"
    assert events[-1] == "data: [DONE]"
    assert len(events) == TOKENS + 4
    payloads = [json.loads(e[6:]) for i, e in enumerate(events[:-1]) if i != 3]
    assert payloads[1]["choices"][0] == {
        "index": 0,
        "delta": {"content": payloads[1]["choices"][0]["delta"]["content"]},
        "finish_reason": None,
    }


def _close_mid_stream(client: openai.OpenAI, port: int, directives: str) -> None:
    tag = new_tag()
    messages = [{"role": "user", "content": f"hi {directives} sim:tag={tag}"}]
    create = client.chat.completions.with_streaming_response.create
    with create(model="sim-fast", messages=messages, stream=True) as resp:
        data_lines = (line for line in resp.iter_lines() if line.startswith("data: "))
        assert "assistant" in next(data_lines)
        assert '"content":' in next(data_lines)
    closed_at = time.monotonic()
    rec = record(port, tag, timeout=1.5)
    assert rec["state"] == "client_closed"
    assert time.monotonic() - closed_at < 1.5
    assert 2 <= rec["chunks_sent"] < 500


def test_client_close_while_streaming(client: openai.OpenAI, port: int) -> None:
    _close_mid_stream(client, port, "sim:tokens=1000 sim:rate=20")


def test_client_close_while_stalled(client: openai.OpenAI, port: int) -> None:
    _close_mid_stream(client, port, "sim:tokens=10 sim:stall_after=1 sim:stall=30")


def test_client_timeout_during_hang(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    with pytest.raises(openai.APITimeoutError):
        stream(client.with_options(timeout=0.5), f"hi sim:hang=30 sim:tag={tag}")
    assert record(port, tag, timeout=1.5)["state"] == "client_closed"


def test_wait_seen_blocks_until_request_arrives(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    with ThreadPoolExecutor(1) as pool:
        seen = pool.submit(record, port, tag, "seen", 20)
        stream(client, f"hi sim:tag={tag}")
        assert seen.result()["tag"] == tag
    status, body = sim_get(port, f"/_sim/requests/{new_tag()}?wait=seen&timeout=0.2")
    assert status == 404 and body["error"]["code"] == "not_found"


def test_models_stats_and_errors(client: openai.OpenAI, port: int) -> None:
    ids = [m.id for m in client.models.list()]
    assert {"gpt-4o-mini", "gpt-4o", "sim-fast"} <= set(ids)
    status, before = sim_get(port, "/_sim/stats")
    assert status == 200 and set(before) == {"cpu_seconds", "requests", "chunks", "open_streams"}
    stream(client, "count me")
    _, after = sim_get(port, "/_sim/stats")
    assert after["requests"] == before["requests"] + 1
    assert after["chunks"] == before["chunks"] + TOKENS + 3
    assert after["cpu_seconds"] >= before["cpu_seconds"]
    status, body = sim_get(port, "/v1/nothing-here")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{nope", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=10)
    assert info.value.code == 400
    assert json.loads(info.value.read())["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        stream(client, "hi sim:bogus=1")


def _raw_exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def test_keep_alive_pipelining_and_connection_close(port: int) -> None:
    get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /_sim/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = _raw_exchange(port, get + get + last)  # returns only because the server closes
    assert reply.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert reply.count(b"Connection: close\r\n") == 1
    assert reply.endswith(b"}")


def test_oversized_head_and_body_are_rejected(port: int) -> None:
    huge = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    assert _raw_exchange(port, huge).startswith(b"HTTP/1.1 431 ")
    big = b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
    assert _raw_exchange(port, big).startswith(b"HTTP/1.1 413 ")
    assert _raw_exchange(port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_sigint_exits_cleanly_and_import_does_not_patch() -> None:
    proc, _ = start_simulator()
    assert stop_simulator(proc, signal.SIGINT) == 0
    code = "import gevent.monkey, devtools.simulator; print(gevent.monkey.is_anything_patched())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_each_write_leaves_at_once() -> None:
    # Real API servers disable Nagle's algorithm; with it on, a token written right after
    # the response head waited for the client's delayed ACK (~40 ms on a kept-alive
    # connection), which every Sluice TTFT measured against the simulator included.
    from devtools.simulator import Simulator

    class Peer:  # an accepted connection whose client leaves without sending anything
        def __init__(self) -> None:
            self.options: list[tuple[int, int, int]] = []

        def setsockopt(self, level: int, option: int, value: int) -> None:
            self.options.append((level, option, value))

        def recv(self, _size: int) -> bytes:
            return b""

        def close(self) -> None:
            pass

    peer = Peer()
    Simulator()._handle(peer, None)
    assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in peer.options


# -- like a tool-calling model (issue 17) ----------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
        },
    },
}


def test_tools_get_a_streamed_tool_call(client: openai.OpenAI, port: int) -> None:
    tag = new_tag()
    chunks = stream(client, f"weather in Paris sim:tag={tag}", tools=[WEATHER])
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    head = deltas[1].tool_calls[0]  # the name first, with the id and no arguments yet
    assert (head.index, head.type, head.function.name, head.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert head.id.startswith("call_")
    fragments = [d.tool_calls[0].function.arguments for d in deltas[2:-1]]
    assert len(fragments) > 2 and all(d.tool_calls[0].id is None for d in deltas[2:-1])
    arguments = json.loads("".join(fragments))
    assert arguments == {"city": "Paris", "days": 1, "unit": "celsius"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert record(port, tag)["request"]["tools"] == [WEATHER]
    messages = [{"role": "user", "content": "weather in Paris"}]
    whole = client.chat.completions.create(model="sim-fast", messages=messages, tools=[WEATHER])
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.content is None
    assert message.tool_calls[0].id == head.id
    assert json.loads(message.tool_calls[0].function.arguments) == arguments
    none = stream(client, "weather in Paris", tools=[WEATHER], tool_choice="none")
    assert text_of(none) and none[-1].choices[0].finish_reason == "stop"


def test_a_tool_result_gets_an_answer_that_uses_it(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    answer = client.chat.completions.create(model="sim-fast", messages=messages, tools=[WEATHER])
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == 'The tool returned: {"temperature": 21} '


def test_response_format_stop_logprobs_refusal_and_finish(client: openai.OpenAI) -> None:
    json_text = text_of(stream(client, "hi sim:tokens=5", response_format={"type": "json_object"}))
    assert set(json.loads(json_text)) == {"answer"}
    properties = {"name": {"type": "string"}, "ok": {"type": "boolean"}}
    schema = {"type": "object", "properties": properties}
    shaped = stream(
        client,
        "a person called Ada",
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},
    )
    assert json.loads(text_of(shaped)) == {"name": "Ada", "ok": True}
    full = "".join(tokens_for("stop here", 30))
    cut = stream(client, "stop here sim:tokens=30", stop=["many", "zzz"])
    assert text_of(cut) == full[: full.index("many")]
    assert cut[-1].choices[0].finish_reason == "stop"
    probs = stream(client, "p sim:tokens=4", logprobs=True, top_logprobs=3)
    entries = [c.choices[0].logprobs.content[0] for c in probs[1:-1]]
    assert [e.token for e in entries] == tokens_for("p", 4)
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    refused = client.chat.completions.create(
        model="sim-fast", messages=[{"role": "user", "content": "x sim:refuse=1"}]
    )
    assert refused.choices[0].message.refusal and refused.choices[0].message.content is None
    filtered = stream(client, "x sim:tokens=3 sim:finish=content_filter")
    assert filtered[-1].choices[0].finish_reason == "content_filter"
    with pytest.raises(openai.BadRequestError):
        stream(client, "x sim:finish=not-a-name")
