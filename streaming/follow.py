"""Followers: the bodies of SSE responses, from a live generation or the Redis log.

A follower yields SSE frames after a given sequence number until the ``done``
frame, and a ``: ping`` comment whenever nothing was sent for
``HEARTBEAT_SECONDS`` (from the first byte on).

Client disconnect. WSGI only tells on a failed write, so a follower also
watches the client socket (``environ["gunicorn.socket"]``): a greenlet waits
for it to become readable and peeks; EOF means the client is gone, and the
follower ends within milliseconds even while the upstream is silent. Ending
detaches it from the generation, which then keeps running for
``DISCONNECT_GRACE_SECONDS`` (a resume may attach meanwhile) and is then
cancelled. The heartbeat writes are the fallback where there is no socket.

A follower on the generation's own worker is fed in-process (woken by the
generation, no Redis reads); on any other worker it replays the Redis log
with XRANGE and follows with XREAD BLOCK, refreshing ``watch:S`` so the
owner does not count the stream as abandoned.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable, Iterator

import gevent
import gevent.event
from gevent.socket import wait_read

from streaming import metrics
from streaming.generation import Generation
from streaming.manager import StreamManager
from streaming.sse import PING

__all__ = ["Body", "ClientWatch", "follow_local", "follow_remote", "is_done_frame"]

logger = logging.getLogger(__name__)

REMOTE_POLL_MS = 1000


def is_done_frame(frame: bytes) -> bool:
    return b"\nevent: done\n" in frame[:48]


class ClientWatch:
    """Notices a client that closed its connection, without writing to it.

    It also gives the client socket a send timeout: a client that stops reading
    (full TCP window) makes a write fail after `send_timeout` seconds instead of
    holding its greenlet forever; the generation is decoupled and never waits.
    """

    def __init__(self, sock: socket.socket | None, send_timeout: float | None = None):
        if sock is not None and send_timeout:
            sock.settimeout(send_timeout)
        self.gone = False
        self.wake = gevent.event.Event()
        self._greenlet = gevent.spawn(self._watch, sock) if sock is not None else None

    def _watch(self, sock: socket.socket) -> None:
        try:
            wait_read(sock.fileno())
            if sock.recv(1, socket.MSG_PEEK) != b"":
                return  # the client sent more (a pipelined request): rely on heartbeats
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EBADF, errno.ENOTCONN, errno.EPIPE):
                logger.debug("client watch: %s", exc)
        self.gone = True
        self.wake.set()

    def close(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)


class Body:
    """A WSGI response body whose `close()` runs its cleanup once, even if never iterated."""

    def __init__(self, frames: Iterator[bytes], cleanup: Callable[[], None]):
        self._frames = frames
        self._cleanup: Callable[[], None] | None = cleanup

    def __iter__(self) -> Body:
        return self

    def __next__(self) -> bytes:
        return next(self._frames)

    def close(self) -> None:
        try:
            self._frames.close()
        finally:
            cleanup, self._cleanup = self._cleanup, None
            if cleanup is not None:
                cleanup()


def follow_local(gen: Generation, after: int, heartbeat: float, watch: ClientWatch) -> Body:
    """Follow a generation of this worker; attached from now until the body is closed."""
    wake = watch.wake
    gen.waiters.add(wake)
    gen.attach()

    def cleanup() -> None:
        if not gen.done:
            metrics.CLIENT_DISCONNECTS.inc()
        gen.waiters.discard(wake)
        gen.detach()
        watch.close()

    def frames() -> Iterator[bytes]:
        sent = after
        while not watch.gone:
            frames = gen.frames
            if sent < len(frames):
                chunk = b"".join(frames[sent:])
                sent = len(frames)
                yield chunk
                continue
            if gen.done:
                return
            wake.clear()
            if not wake.wait(heartbeat) and not watch.gone:
                yield PING

    return Body(frames(), cleanup)


def follow_remote(
    manager: StreamManager, stream_id: str, after: int, heartbeat: float, watch: ClientWatch
) -> Body:
    """Follow a stream of another worker (or a finished one) through the Redis log."""
    return Body(_remote_frames(manager, stream_id, after, heartbeat, watch), watch.close)


def _remote_frames(
    manager: StreamManager, stream_id: str, after: int, heartbeat: float, watch: ClientWatch
) -> Iterator[bytes]:
    frames = manager.log.read(stream_id, after, None)
    quiet = 0.0
    while not watch.gone:
        if frames:
            after += len(frames)
            quiet = 0.0
            yield b"".join(frames)
            if is_done_frame(frames[-1]):
                return
        manager.log.touch_watch(stream_id)
        block = min(REMOTE_POLL_MS, max(1, int((heartbeat - quiet) * 1000)))
        frames = manager.log.read(stream_id, after, block)
        if not frames:
            quiet += block / 1000
            if quiet >= heartbeat:
                quiet = 0.0
                yield PING
            if not manager.redis.exists(f"sluice:stream:{stream_id}"):
                return  # expired: its worker died and nothing more will come
