"""Followers: the bodies of SSE responses, from a live generation or the Redis log.

A follower yields SSE frames after a given sequence number until the ``done``
frame, and a ``: ping`` comment whenever nothing was sent for
``HEARTBEAT_SECONDS`` (from the first byte on; within about a second, see
`Heartbeats`).

Client disconnect. WSGI only tells on a failed write, so a follower also
watches the client socket (``environ["gunicorn.socket"]``): a libev read
watcher on it (no greenlet) runs a callback in the hub when it becomes
readable, which peeks; EOF means the client is gone, and the follower ends
within milliseconds even while the upstream is silent. Ending detaches it from
the generation, which then keeps running for ``DISCONNECT_GRACE_SECONDS`` (a
resume may attach meanwhile) and is then cancelled. The heartbeat writes are
the fallback where there is no socket.

A follower on the generation's own worker is fed in-process (woken by the
generation, no Redis reads). On any other worker it is the same
`LocalFollower`, over the `streaming.core.logreader.RemoteStream` that the
worker's one log reader fills from the Redis event log (one XREAD for all the
worker's remote followers; no Redis connection per follower), which also
refreshes ``watch:S`` so the owner does not count the stream as abandoned.
A finished stream is replayed with one XRANGE (`replay`).

Memory. An idle stream is mostly parked state, so a local follower keeps it
small: it is its own WSGI iterator (no generator frame), it sleeps on a
`Wake` (a bare hub switch: no `Timeout`, a shallower saved C stack than
``Event.wait``), one timer per worker (`Heartbeats`) wakes the followers that
owe a ping, and the client watch is a libev watcher rather than a greenlet.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator

from gevent import get_hub, getcurrent
from greenlet import greenlet

from streaming import metrics
from streaming.core.generation import Generation
from streaming.core.logreader import LogReader, RemoteStream
from streaming.sse import PING, without_deltas

__all__ = [
    "Body",
    "ClientWatch",
    "Heartbeats",
    "LocalFollower",
    "Wake",
    "follow_local",
    "follow_log",
]

logger = logging.getLogger(__name__)

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_GONE_ERRNOS = (errno.ECONNRESET, errno.EBADF, errno.ENOTCONN, errno.EPIPE)


class Wake:
    """A flag one greenlet sleeps on; `set()` from any greenlet or from the hub.

    Lighter than ``gevent.event.Event`` for a single sleeper that re-checks its
    condition on every wake: the sleeper parks with a bare switch to the hub (no
    `Timeout`, a shallower saved C stack), and ``set()`` schedules one hub
    callback that switches back to it; a late callback (the sleeper woke
    otherwise, e.g. killed) does nothing.
    """

    __slots__ = ("flag", "_hub", "_sleeper", "_pending")

    def __init__(self) -> None:
        self.flag = False
        self._hub = get_hub()
        self._sleeper: greenlet | None = None
        self._pending = False

    def set(self) -> None:
        self.flag = True
        if self._sleeper is not None and not self._pending:
            self._pending = True
            self._hub.loop.run_callback(self._fire)

    def _fire(self) -> None:  # in the hub
        self._pending = False
        sleeper = self._sleeper
        if sleeper is not None:
            try:
                sleeper.switch()
            except BaseException:
                self._hub.handle_error(sleeper, *sys.exc_info())

    def clear(self) -> None:
        self.flag = False

    def wait(self) -> None:
        """Sleep until `set()`; at once if it was set since the last `clear()`."""
        if self.flag:
            return
        self._sleeper = getcurrent()
        try:
            self._hub.switch()
        finally:
            self._sleeper = None


class ClientWatch:
    """Notices a client that closed its connection, without writing to it.

    A libev read watcher on the client socket; its callback (in the hub) peeks
    without blocking: EOF or a reset marks the client `gone` and sets `wake`;
    data (a pipelined request) ends the watch (heartbeat writes remain). It
    must be closed (`close()`, done by the follower's body) before the socket
    is, as libev must not watch a closed (and maybe reused) descriptor.

    It also gives the client socket a send timeout: a client that stops reading
    (full TCP window) makes a write fail after `send_timeout` seconds instead of
    holding its greenlet forever; the generation is decoupled and never waits.
    """

    __slots__ = ("gone", "wake", "_raw", "_io")

    def __init__(self, sock: socket.socket | None, send_timeout: float | None = None):
        self.gone = False
        self.wake = Wake()
        self._raw = None
        self._io = None
        if sock is None:
            return
        if send_timeout:
            sock.settimeout(send_timeout)
        # The OS socket under gevent's wrapper: the callback runs in the hub, where
        # gevent's own recv must not wait (MSG_DONTWAIT keeps the peek non-blocking).
        self._raw = getattr(sock, "_sock", sock)
        fd = sock.fileno()
        if fd < 0:
            self.gone = True  # closed already
            return
        io = get_hub().loop.io(fd, 1)  # 1: EV_READ
        io.start(self._readable)
        self._io = io

    def _readable(self) -> None:
        try:
            if self._raw.recv(1, _PEEK) != b"":
                self.close()  # the client sent more (a pipelined request): rely on heartbeats
                return
        except (BlockingIOError, InterruptedError):
            return  # not really readable: keep watching
        except OSError as exc:
            if exc.errno not in _GONE_ERRNOS:
                logger.debug("client watch: %s", exc)
        self.close()
        self.gone = True
        self.wake.set()

    def close(self) -> None:
        io, self._io = self._io, None
        self._raw = None
        if io is not None:
            io.stop()
            io.close()


class Heartbeats:
    """One repeating libev timer per worker process that wakes the followers owing a ping.

    A follower registers while it is attached and notes when it last sent; every
    `interval` seconds (its heartbeat / 8, between 50 ms and 1 s) the timer wakes
    those quiet for their heartbeat (less half an interval), so a ping goes out
    within half an interval of its time, at no cost per wait. The timer runs only
    while followers are registered and never keeps the hub alive. `get()` makes
    one per process and hub: never in the gunicorn master, never shared by a fork.
    """

    MIN_INTERVAL, MAX_INTERVAL, PER_HEARTBEAT = 0.05, 1.0, 8

    _current: Heartbeats | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = get_hub().loop
        self.followers: set[LocalFollower] = set()
        self.interval = self.MAX_INTERVAL
        self._timer = None

    @classmethod
    def get(cls) -> Heartbeats:
        current = cls._current
        if current is None or current.pid != os.getpid() or current.loop is not get_hub().loop:
            current = cls._current = cls()
        return current

    def add(self, follower: LocalFollower) -> None:
        interval = min(
            self.MAX_INTERVAL, max(self.MIN_INTERVAL, follower.heartbeat / self.PER_HEARTBEAT)
        )
        if self._timer is None or interval < self.interval:
            self._restart(interval)
        self.followers.add(follower)

    def discard(self, follower: LocalFollower) -> None:
        self.followers.discard(follower)
        if not self.followers and self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _restart(self, interval: float) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
        self.interval = interval
        timer = self.loop.timer(interval, interval)
        timer.ref = False
        timer.start(self._tick)
        self._timer = timer

    def _tick(self) -> None:
        now = time.monotonic()
        early = self.interval / 2
        for follower in self.followers:
            if not follower.ping and now - follower.last >= follower.heartbeat - early:
                follower.ping = True
                follower.wake.set()


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


class LocalFollower:
    """The body of a response following a generation of this worker (see `follow_local`).

    Its own iterator, so that a parked stream holds no generator frame: `__next__`
    returns the frames not sent yet (joined), or a ping when `Heartbeats` says so,
    and sleeps on the watch's `Wake` (set by the generation, the client watch and
    the heartbeat timer) when there is nothing to send.
    """

    __slots__ = (
        "gen",
        "watch",
        "wake",
        "heartbeat",
        "sent",
        "last",
        "ping",
        "text_only",
        "_heartbeats",
    )

    def __init__(
        self,
        gen: Generation | RemoteStream,
        after: int,
        heartbeat: float,
        watch: ClientWatch,
        text_only: bool = False,
    ):
        self.gen = gen
        self.text_only = text_only  # skip `delta` events (a /v1 generation seen natively)
        self.watch = watch
        self.wake = watch.wake
        self.heartbeat = heartbeat
        self.sent = after
        self.last = time.monotonic()  # a ping is owed `heartbeat` after the first byte
        self.ping = False
        gen.waiters.add(self.wake)
        gen.attach()
        self._heartbeats: Heartbeats | None = Heartbeats.get()
        self._heartbeats.add(self)

    def __iter__(self) -> LocalFollower:
        return self

    def __next__(self) -> bytes:
        gen, watch, wake = self.gen, self.watch, self.wake
        while not watch.gone and self._heartbeats is not None:
            wake.flag = False
            frames = gen.frames
            start = self.sent - gen.base  # frames[i] is seq base + 1 + i
            if start < len(frames):
                start = max(start, 0)  # seqs trimmed from a long log's start are gone
                self.sent = gen.base + len(frames)
                out = frames[start] if len(frames) == start + 1 else b"".join(frames[start:])
                if self.text_only and not (out := without_deltas(out)):
                    continue
                self.last = time.monotonic()
                self.ping = False
                return out
            if gen.done:
                break
            if self.ping:
                self.ping = False
                self.last = time.monotonic()
                return PING
            wake.wait()
        raise StopIteration

    def close(self) -> None:
        heartbeats, self._heartbeats = self._heartbeats, None
        if heartbeats is None:
            return
        gen = self.gen
        if not gen.done:
            metrics.CLIENT_DISCONNECTS.inc()
        heartbeats.discard(self)
        gen.waiters.discard(self.wake)
        gen.detach()
        self.watch.close()


def follow_local(
    gen: Generation, after: int, heartbeat: float, watch: ClientWatch, text_only: bool = False
) -> LocalFollower:
    """Follow a generation of this worker; attached from now until the body is closed.

    `text_only`: skip ``delta`` events (the native API following a /v1 generation).
    """
    return LocalFollower(gen, after, heartbeat, watch, text_only)


def follow_log(
    reader: LogReader,
    stream_id: str,
    after: int,
    heartbeat: float,
    watch: ClientWatch,
    text_only: bool = False,
) -> LocalFollower:
    """Follow a stream of another worker or host through this worker's log reader."""
    return LocalFollower(reader.follow(stream_id), after, heartbeat, watch, text_only)
