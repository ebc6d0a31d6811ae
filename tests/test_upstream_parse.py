"""Parsing the upstream's SSE bytes (real httpx2 responses over byte streams)."""

from __future__ import annotations

import json

import httpx2
import pytest

from streaming.upstream.client import UpstreamError, UpstreamStream

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


class _Manager:
    def __exit__(self, *exc: object) -> None:
        pass


def chunk(content=None, finish=None, usage=None, choices=True) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "choices": []}
    if choices:
        delta = {} if content is None else {"content": content}
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def stream_of(*pieces: bytes) -> UpstreamStream:
    response = httpx2.Response(200, content=iter(pieces))
    return UpstreamStream(_Manager(), response)


def test_text_finish_and_usage():
    s = stream_of(
        chunk(""),
        chunk("Hel"),
        chunk("lo\n"),
        chunk(finish="stop"),
        chunk(usage={"prompt_tokens": 3, "completion_tokens": 2}, choices=False),
        b"data: [DONE]\n\n",
    )
    assert "".join(s.iter_text()) == "Hello\n"
    assert (s.finish_reason, s.saw_done, s.deltas) == ("stop", True, 2)
    assert s.usage == {"prompt_tokens": 3, "completion_tokens": 2}


def test_lines_split_across_network_reads():
    raw = chunk("a") + chunk("b") + chunk(finish="length") + b"data: [DONE]\n\n"
    s = stream_of(*(raw[i : i + 7] for i in range(0, len(raw), 7)))
    assert "".join(s.iter_text()) == "ab"
    assert s.finish_reason == "length"


def test_comments_and_other_fields_are_ignored():
    s = stream_of(b": keep-alive\n\nevent: message\n" + chunk("x") + chunk(finish="stop"))
    assert "".join(s.iter_text()) == "x"


def test_a_clean_end_without_finish_or_done_is_truncation():
    s = stream_of(chunk("a"), chunk("b"))
    with pytest.raises(UpstreamError) as err:
        list(s.iter_text())
    assert err.value.code == "upstream_error"


@pytest.mark.parametrize(
    "bad", [b"data: {nope\n\n", b"data: [1, 2]\n\n", b'data: {"choices": [{"delta": "x"}]}\n\n']
)
def test_malformed_chunk(bad):
    s = stream_of(chunk("a"), bad, chunk(finish="stop"))
    with pytest.raises(UpstreamError) as err:
        list(s.iter_text())
    assert err.value.code == "upstream_error"


def test_an_error_object_in_the_stream():
    s = stream_of(chunk("a"), b'data: {"error": {"message": "overloaded"}}\n\n')
    with pytest.raises(UpstreamError):
        list(s.iter_text())


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (b"data: {not json\n\n", "The model provider sent a bad chunk."),
        (
            b'data: {"error": {"message": "overloaded"}}\n\n',
            "The model provider reported an error.",
        ),
        (b"data: [1, 2]\n\n", "The model provider sent a bad chunk."),
        (b"data: 1, 2\n\n", "The model provider sent a bad chunk."),
    ],
)
def test_text_before_a_bad_chunk_in_the_same_read_is_kept(bad, message):
    s = stream_of(chunk("Hel") + chunk("lo") + bad + chunk("never"))
    texts = s.iter_text()
    assert next(texts) == "Hello"
    with pytest.raises(UpstreamError) as err:
        next(texts)
    assert (err.value.code, err.value.message) == ("upstream_error", message)
    assert s.deltas == 2
