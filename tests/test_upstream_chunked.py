"""Reading a chunked body past h11, and handing the connection back to h11 at its end.

Every property is checked against real h11: the head and the bytes that came
with it go to an h11 client connection (as httpcore gives them), the body is
decoded by `ChunkedBody` from arbitrary network reads, and the completion it
offers must take h11 to the end of the message with the connection reusable.
"""

from __future__ import annotations

import h11
import httpcore2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.upstream.net import ChunkedBody

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


class Wire:
    """What ChunkedBody needs of a PacedStream: the head bytes read with it, then reads."""

    def __init__(self, head: bytes, reads: list[bytes]):
        self.head = head
        self._reads = list(reads)

    def read(self, _max_bytes: int = 65536) -> bytes:
        return self._reads.pop(0) if self._reads else b""


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces)
    return body + b"0\r\n" + trailer + b"\r\n"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


def h11_after_head(prefix: bytes) -> h11.Connection:
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")])
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(HEAD + prefix)
    assert isinstance(conn.next_event(), h11.Response)
    return conn


def h11_finishes(conn: h11.Connection, completion: bytes) -> bool:
    conn.receive_data(completion)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            return False
        if isinstance(event, h11.EndOfMessage):
            return conn.their_state is h11.DONE
        assert isinstance(event, h11.Data)


pieces_st = st.lists(st.binary(min_size=1, max_size=40), max_size=12)
trailer_st = st.sampled_from([b"", b"X-Usage: 1\r\n"])


@settings(max_examples=400, deadline=None)
@given(
    pieces=pieces_st,
    trailer=trailer_st,
    prefix_len=st.integers(0, 10_000),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_any_reads_decode_the_body_and_hand_back_a_reusable_connection(
    pieces, trailer, prefix_len, cuts
):
    body = chunked(pieces, trailer)
    prefix_len %= len(body) + 1
    prefix, rest = body[:prefix_len], body[prefix_len:]
    decoded = ChunkedBody(Wire(HEAD + prefix, split(rest, cuts) if rest else []))
    assert b"".join(decoded) == b"".join(pieces)
    assert decoded.complete
    completion = decoded.completion()
    assert completion is not None
    assert h11_finishes(h11_after_head(prefix), completion)


@settings(max_examples=200, deadline=None)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8),
    cut=st.integers(0, 10_000),
)
def test_a_connection_that_ends_inside_the_body_is_an_error(pieces, cut):
    body = chunked(pieces)
    body = body[: cut % len(body)]  # never the complete body
    with pytest.raises(httpcore2.RemoteProtocolError):
        b"".join(ChunkedBody(Wire(HEAD, [body] if body else [])))


@pytest.mark.parametrize("bad", [b"zz\r\nabc\r\n", b"-1\r\n", b"3\r\nabcXY0\r\n\r\n", b"f" * 2000])
def test_bad_framing_is_an_error(bad):
    with pytest.raises(httpcore2.RemoteProtocolError):
        b"".join(ChunkedBody(Wire(HEAD, [bad])))


def test_bytes_after_the_end_mean_the_connection_is_not_reused():
    body = ChunkedBody(Wire(HEAD + chunked([b"data: x\n\n"]) + b"HTTP/1.1 200 OK\r\n", []))
    assert b"".join(body) == b"data: x\n\n"
    assert body.completion() is None


def test_a_body_cut_short_is_not_handed_back():
    body = ChunkedBody(Wire(HEAD + b"5\r\nhel", [b"lo\r\n"]))
    parts = iter(body)
    assert next(parts) == b"hel" and next(parts) == b"lo"
    assert body.completion() is None  # not complete: the caller closes the connection
