"""Unit: the upstream line parser's two paths (content alone; every other delta, in order),
the ``done.reason`` an upstream's finish_reason gives, and the native API's view of frames."""

from __future__ import annotations

import json

import httpx2
import pytest

from streaming.core.generation import done_reason
from streaming.sse import encode_json, split_frames, without_deltas
from streaming.upstream.client import UpstreamStream

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


def stream(relay_deltas: bool) -> UpstreamStream:
    return UpstreamStream(None, httpx2.Response(200), relay_deltas)


def lines(*choices: dict) -> list[bytes]:
    out = []
    for choice in choices:
        chunk = {"id": "c", "object": "chat.completion.chunk", "choices": [choice]}
        out += [b"data: " + json.dumps(chunk).encode(), b""]
    return out


def content(text: str) -> dict:
    return {"index": 0, "delta": {"content": text}, "finish_reason": None}


CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": ""}}
TOOL = {"index": 0, "delta": {"tool_calls": [CALL], "refusal": None}, "finish_reason": None}
ARGS = {"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}
PROBS = {"content": [{"token": "b", "logprob": -1.0}], "refusal": None}
ROLE = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}


@pytest.mark.parametrize("relay", [True, False])
def test_content_alone_is_text(relay):
    s = stream(relay)
    assert s._parse(lines(ROLE, content("a"), content("b"))) == "ab"
    assert not s.extras and s.deltas == 2


def test_other_deltas_keep_their_order_with_the_text():
    s = stream(True)
    with_probs = {"index": 0, "delta": {"content": "b"}, "logprobs": PROBS}
    end = {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
    got = s._parse(lines(content("a"), TOOL, with_probs, ARGS, content("c"), end))
    assert got == ""  # the read's text travels with its other deltas
    assert s.take_extras() == [
        "a",
        {"tool_calls": [CALL]},  # None fields and the role are not relayed
        "b",
        {"logprobs": PROBS},
        ARGS["delta"],
        "c",
    ]
    assert s.extras == [] and s.finish_reason == "tool_calls" and s.deltas == 5
    assert s._parse(lines(content("d"))) == "d"  # the next read is back on the fast path


def test_the_native_api_keeps_the_text_only():
    s = stream(False)
    with_probs = {"index": 0, "delta": {"content": "b"}, "logprobs": PROBS}
    assert s._parse(lines(content("a"), TOOL, with_probs, ARGS)) == "ab"
    assert s.extras is None


def test_a_bad_delta_is_a_bad_chunk():
    s = stream(True)
    s._parse(lines({"index": 0, "delta": {"content": 5, "x": 1}}))
    assert s._failed == "The model provider sent a bad chunk."


@pytest.mark.parametrize(
    ("finish", "reason"),
    [
        (None, "stop"),
        ("stop", "stop"),
        ("length", "length"),
        ("tool_calls", "tool_calls"),
        ("content_filter", "content_filter"),
        ("function_call", "function_call"),
        ("cancelled", "stop"),  # never mistaken for Sluice's own
        ("error", "stop"),
        ("not an identifier", "stop"),
        ("x" * 41, "stop"),
        (5, "stop"),
    ],
)
def test_done_reason_is_the_upstreams_finish_reason(finish, reason):
    assert done_reason(finish) == reason


def test_native_followers_drop_delta_events():
    frames = [
        encode_json({"type": "start"}, event="start", id=1),
        encode_json({"type": "delta", "deltas": [{"refusal": "no"}]}, event="delta", id=2),
        encode_json({"type": "token", "token": "event: delta"}, event="token", id=3),
        b": ping\n\n",
        encode_json({"type": "done"}, event="done", id=4),
    ]
    joined = b"".join(frames)
    assert split_frames(without_deltas(joined)) == [frames[0], frames[2], frames[3], frames[4]]
    plain = frames[0] + frames[2]
    assert without_deltas(plain) is plain


def test_deltas_accumulate_as_the_sdks_do():
    from streaming.web.openai_answer import accumulate

    acc: dict = {}
    for delta in [
        {"tool_calls": [{"index": 0, "id": "a", "type": "function", "function": {"name": "f"}}]},
        {"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "g"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]},
        {"refusal": "no"},
        {"refusal": " way"},
        {"a_provider_field": ["p"]},
        {"a_provider_field": ["q"]},
    ]:
        accumulate(acc, delta)
    assert acc == {
        "tool_calls": [
            {
                "index": 0,
                "id": "a",
                "type": "function",
                "function": {"name": "f", "arguments": '{"x": 1}'},
            },
            {
                "index": 1,
                "id": "b",
                "type": "function",
                "function": {"name": "g", "arguments": "{}"},
            },
        ],
        "refusal": "no way",
        "a_provider_field": ["p", "q"],
    }
