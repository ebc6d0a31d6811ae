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
(see `streaming.generation`). It reaches the relay as httpcore's
``network_stream`` response extension.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Callable
from typing import Any

import httpcore2
from gevent import monkey

__all__ = ["NonYieldingBackend", "PacedStream", "socket_readable"]

_poll = monkey.get_original("select", "poll")


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
        self.write = stream.write  # type: ignore[method-assign]
        self._sock = stream.get_extra_info("socket")
        self._tls_pending = getattr(self._sock, "pending", None)  # TLS: decrypted, unread bytes
        self.pace: Callable[[], None] | None = None  # called before a read that would wait

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self.pace is not None and not self.readable():
            self.pace()
        return self._read(max_bytes, timeout)

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
