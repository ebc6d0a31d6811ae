"""The upstream's network backend: httpcore's own, but pool checks never yield to gevent.

Before reusing a pooled keep-alive connection (and again when a response is
released), httpcore checks every idle connection for a server-side close with
``select.poll()`` and a zero timeout. Under gevent's monkey-patching that
``poll`` is gevent's: even with a zero timeout it parks the greenlet and waits
for the event loop to come round, once per idle connection. On a busy worker
that was hundreds of milliseconds before a new stream's request was even sent
(measured: upstream response head p90 532 ms at 200 streams × 50 tokens/s).
The check here uses the operating system's ``poll`` (never patched: a zero
timeout never blocks), so it costs one system call and no trip through the
loop. Everything else is httpcore's `SyncBackend`, unchanged.

Each connection's stream also takes an optional ``pace`` callback, called
before a network read that would wait while it is set: the relay pauses there
(see `streaming.core.generation`). It reaches the relay as httpcore's
``network_stream`` response extension.

A chunked response body can also be read straight off the connection with
`ChunkedBody`, past h11: h11 and httpcore's layers cost ~5 µs per chunk, more
than the rest of the relay's work on it. The connection remains httpcore's:
when the body ended cleanly, httpcore's parser is given exactly the bytes it
still needs to reach the end of the message (see `ChunkedBody.release`),
so the connection goes back to the pool for the next request (a new TLS
connection per stream would cost far more than it saves).

Intentional divergence, fenced here (do not "fix" it elsewhere). `ChunkedBody`
is the one place that reads a response body without h11. Its invariant: it
starts from the bytes `PacedStream` saw after the request was written (the
head of *this* response, checked by the caller), decodes the chunked framing
itself, and at a clean end gives h11 exactly the bytes that take it to the
end of the same message (the real ones it has not seen, or the terminating
chunk), never bytes of another message; anything else (bad framing, bytes
after the end, a huge unseen chunk) closes the connection instead of
reusing it. Why: measured in an alternating A/B (bench/RESULTS.md,
2026-11-30), relay CPU per 1,000 tokens went from 43.2 to 34.0 ms paced and
from 12.7 to 5.5 ms back-to-back. The way back: set `READ_BODY_PAST_H11` to
False and every body is read through httpx/httpcore/h11 as published (the
tests run both). httpcore2 and h11 are pinned for it in requirements.txt.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpcore2
from gevent import monkey

__all__ = [
    "READ_BODY_PAST_H11",
    "ChunkedBody",
    "NonYieldingBackend",
    "PacedStream",
    "socket_readable",
]

_poll = monkey.get_original("select", "poll")
MAX_CATCH_UP = 1 << 20
READ_BODY_PAST_H11 = True  # False: the way back to h11 for every body (see above)


def socket_readable(sock: socket.socket | None) -> bool:
    """Would a recv() return at once (data, or EOF)? Never waits, never yields."""
    fd = sock.fileno() if sock is not None else -1
    if fd < 0:
        return True  # closed: as good as readable (the next read returns b"")
    poller = _poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class PacedStream(httpcore2.NetworkStream):
    """httpcore's stream, with `is_readable` answered by `socket_readable`, and a ``pace`` hook."""

    def __init__(self, stream: httpcore2.NetworkStream):
        self._stream = stream
        self._read = stream.read
        self._write = stream.write
        self._sock = stream.get_extra_info("socket")
        self._tls_pending = getattr(self._sock, "pending", None)  # TLS: decrypted, unread bytes
        self.pace: Callable[[], None] | None = None  # called before a read that would wait
        # Bytes read since the request was sent, until its head ended; then `head` holds
        # them: the response head and the body bytes that came with it.
        self._head: bytearray | None = None
        self.head: bytes | None = None
        self._replay: bytes | None = None  # returned by reads instead of the socket's bytes

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._head, self.head, self._replay = bytearray(), None, None
        self._write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._replay is not None:
            data, self._replay = self._replay, b""  # then b"": never the socket again
            return data
        if self.pace is not None and not self.readable():
            self.pace()
        data = self._read(max_bytes, timeout)
        if self._head is not None:
            self._head += data
            if b"\r\n\r\n" in self._head:
                self.head, self._head = bytes(self._head), None
        return data

    def replay(self, data: bytes) -> None:
        """From now until the next request, reads return `data` once and then b""."""
        self._replay = data

    def readable(self) -> bool:
        """Would a read return at once?"""
        pending = self._tls_pending
        return (pending is not None and pending() > 0) or socket_readable(self._sock)

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout=None):
        return PacedStream(self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return socket_readable(self._sock)
        return self._stream.get_extra_info(info)


class ChunkedBody:
    """A chunked response body, read off a `PacedStream` after httpcore parsed the head.

    Iterating yields the body's data one network read at a time (b"" when a
    read held only framing); it raises httpcore's `RemoteProtocolError` on bad
    framing and on a connection that ends before the terminating chunk.
    """

    def __init__(self, stream: PacedStream):
        head = stream.head or b""
        prefix = head[head.index(b"\r\n\r\n") + 4 :]  # in httpcore's parser, not parsed yet
        self._stream = stream
        self._buf = prefix  # not decoded yet
        self._off = 0  # body offset of _buf[0]
        self._need = 0  # data bytes left in the current chunk
        self._crlf = self._trailer = False  # expecting a chunk's CRLF / the trailer lines
        self.complete = False  # the terminating chunk and the trailer were read
        self._given = len(prefix)  # body bytes httpcore's parser has received
        self._tail: bytearray | None = bytearray()  # body bytes after those, while needed
        self._catch_up: bytes | None = None  # from there to the next chunk boundary
        self._boundary(0)

    def _boundary(self, offset: int) -> None:
        # A chunk size line starts here; httpcore's parser could stop here cleanly.
        if self._catch_up is None and offset >= self._given and self._tail is not None:
            self._catch_up, self._tail = bytes(self._tail[: offset - self._given]), None

    def __iter__(self) -> Iterator[bytes]:
        yield self._decode()
        read = self._stream.read
        while not self.complete:
            data = read(65536)
            if not data:
                raise httpcore2.RemoteProtocolError("connection closed inside the body")
            if self._tail is not None:
                self._tail += data
                if len(self._tail) > MAX_CATCH_UP:  # a huge chunk: not worth keeping to reuse
                    self._tail = None
            self._buf = self._buf + data if self._buf else data
            yield self._decode()

    def _decode(self) -> bytes:
        buf, pos, end, out = self._buf, 0, len(self._buf), []
        while pos < end and not self.complete:
            if self._need:
                take = min(self._need, end - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._need -= take
                self._crlf = not self._need
            elif self._crlf:
                if end - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise httpcore2.RemoteProtocolError("malformed chunk footer")
                pos += 2
                self._crlf = False
                self._boundary(self._off + pos)
            else:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if end - pos > 1024:
                        raise httpcore2.RemoteProtocolError("chunk header too long")
                    break
                line, pos = buf[pos:eol], eol + 2
                if self._trailer:
                    self.complete = not line  # an empty line ends the trailer
                    continue
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise httpcore2.RemoteProtocolError("illegal chunk header") from None
                if size < 0:
                    raise httpcore2.RemoteProtocolError("illegal chunk header")
                self._need, self._trailer = size, size == 0
        self._off += pos
        self._buf = buf[pos:]
        return b"".join(out) if len(out) != 1 else out[0]

    def release(self) -> bool:
        """After a clean end: make the stream's next reads give httpcore's parser `completion()`.

        False when the connection cannot be reused (close it instead).
        """
        completion = self.completion()
        if completion is None:
            return False
        self._stream.replay(completion)
        return True

    def completion(self) -> bytes | None:
        """The bytes that take httpcore's parser to the end of the message, after a clean end.

        None when the connection cannot be reused (the body did not end, or
        bytes followed it).
        """
        if not self.complete or self._buf:
            return None
        if self._catch_up is None:  # the parser has part of the terminating chunk: the rest
            return bytes(self._tail[: self._off - self._given]) if self._tail is not None else None
        return self._catch_up + b"0\r\n\r\n"


class NonYieldingBackend(httpcore2.NetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore2.SyncBackend()
        self.connections = 0  # opened so far (pooled ones are reused, not counted again)

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        stream = PacedStream(self._backend.connect_tcp(*args, **kwargs))
        self.connections += 1
        return stream

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        stream = PacedStream(self._backend.connect_unix_socket(*args, **kwargs))
        self.connections += 1
        return stream

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)
