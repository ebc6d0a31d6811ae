"""The pure SSE encoder."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streaming.sse import PING, RETRY, comment, encode, encode_json, parse

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_json_frame_shape():
    frame = encode_json({"type": "token", "token": "hi"}, event="token", id=3)
    assert frame == b'id: 3\nevent: token\ndata: {"type":"token","token":"hi"}\n\n'


@given(st.text())
def test_any_token_text_stays_in_one_frame(text):
    frame = encode_json({"token": text}, event="token", id=1)
    assert frame.count(b"\n\n") == 1 and frame.endswith(b"\n\n")
    (event,) = parse(frame)
    assert json.loads(event["data"]) == {"token": text}


@given(st.text())
def test_multiline_data_round_trips(text):
    (event,) = parse(encode(text, event="message", id=9))
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert event["data"] == expected and event["id"] == "9"


def test_newlines_are_stripped_from_id_and_event():
    frame = encode("x", event="to\nken\r", id="1\n2")
    assert frame == b"id: 12\nevent: token\ndata: x\n\n"


def test_comments():
    assert PING == b": ping\n\n"
    assert comment("a\nb") == b": a\n: b\n\n"
    assert parse(PING + encode("x")) == [{"data": "x"}]


def test_the_retry_field_that_opens_api_streams_is_no_event():
    assert RETRY == b"retry: 1000\n\n"
    assert parse(RETRY + encode("x", event="start", id=1)) == [
        {"id": "1", "event": "start", "data": "x"}
    ]
