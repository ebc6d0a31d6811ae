"""Following streams of other workers: one Redis reader per worker for all its followers.

A follower of a stream that runs on another worker or host (a resume, a second
tab, an attach after ``POST /api/v1/completions``) costs no Redis connection
of its own. The worker's one `LogReader` greenlet holds one connection and
blocks in a single ``XREAD BLOCK`` on the event logs of every stream its
followers watch (XREAD takes many keys). What it reads goes into a
`RemoteStream` per stream: the frames so far, shared by every follower of it
on this worker. Followers are the same `streaming.core.follow.LocalFollower` that
follows a local generation: they are woken in-process, never touch Redis.

- A new stream: its `RemoteStream` starts empty and the reader is asked to
  read it from the log's beginning at once: a blocked ``XREAD`` is ended with
  ``CLIENT UNBLOCK`` (one short command on the pool, at most one per read)
  and the next read, without ``BLOCK``, takes the new logs in one call. A
  reconnect storm of N followers is a handful of XREADs, not N connections.
- Every `HOUSEKEEPING` seconds, one pipeline (on the pool) refreshes
  ``watch:S`` for each watched stream (so its owner does not count it as
  abandoned) and asks whether ``stream:S`` still exists: a stream whose
  worker died and whose entry expired ends its followers.
- A stream whose ``done`` frame was read is no longer read; its
  `RemoteStream` lives while followers are attached.
- Redis away: the reader retries with a backoff; followers keep their
  heartbeats, and go on where they were once Redis answers.

On a Redis Cluster XREAD's keys must share a slot: a stream's keys carry its
shard's tag (`streaming.core.keys`), and the worker runs one reader per shard
that it follows streams of (at most `streaming.core.keys.SHARDS`), each with
one connection to the master serving that shard, learnt again after an error
(a failover: the connection drops and the slot map is refreshed). Elsewhere
one reader serves every stream, as every key is on the one server.

Redis connections per worker: the readers' (one; on a cluster one per shard
followed, at most 16), plus the cancel listener's, plus the pool's short
commands, all from the app's bounded pool (`streaming.redis_conn`), whatever
the number of followers.
"""

from __future__ import annotations

import logging
import time

import gevent
import gevent.event
import redis

from streaming.core import keys
from streaming.core.eventlog import EventLog, frames_after
from streaming.redis_conn import dedicated, is_cluster, node_client, refresh
from streaming.sse import is_done_frame

__all__ = ["LogReader", "RemoteStream"]

logger = logging.getLogger(__name__)

BLOCK_MS = 1000
HOUSEKEEPING = 1.0
COUNT = 1000  # entries per log and read: a long log is read in a few calls


class RemoteStream:
    """Another worker's stream as this worker reads it from the log.

    Duck-types the part of `streaming.core.generation.Generation` that a follower
    uses: ``frames`` (``frames[i]`` is seq ``base + 1 + i``), ``done``,
    ``waiters``, `attach` and `detach`.
    """

    __slots__ = ("stream_id", "frames", "base", "done", "waiters", "attached", "_reader")

    def __init__(self, reader: ShardReader, stream_id: str):
        self.stream_id = stream_id
        self.frames: list[bytes] = []
        self.base = 0  # seqs before the first frame held (a log trimmed at its start)
        self.done = False
        self.waiters: set = set()
        self.attached = 0
        self._reader = reader

    @property
    def cursor(self) -> int:
        """The last seq read."""
        return self.base + len(self.frames)

    def add(self, entries: list) -> None:
        if not entries:
            return
        if not self.frames:  # the log's first entries may be trimmed away
            self.base = max(self.base, int(entries[0][1][b"f"]) - 1)
        frames, _ = frames_after(entries, self.cursor)
        if frames:
            self.frames.extend(frames)
            if is_done_frame(frames[-1]):
                self.done = True
            self._wake()

    def end(self) -> None:
        """Nothing more will come (its entry expired): followers end after what they have."""
        self.done = True
        self._wake()

    def _wake(self) -> None:
        for waiter in self.waiters:
            waiter.set()

    def attach(self) -> None:
        self.attached += 1

    def detach(self) -> None:
        self.attached -= 1
        if self.attached <= 0:
            self._reader.drop(self)


class LogReader:
    """One per worker process (the `StreamManager`'s): follows the logs of every watched
    stream, with one `ShardReader` per shard on a cluster, one in all elsewhere."""

    def __init__(self, redis_client: redis.Redis, log: EventLog):
        self.redis = redis_client
        self.log = log
        self.readers: dict[int, ShardReader] = {}

    @property
    def streams(self) -> dict[str, RemoteStream]:
        return {sid: s for reader in self.readers.values() for sid, s in reader.streams.items()}

    def follow(self, stream_id: str) -> RemoteStream:
        """The stream's shared state here (attach a follower to it); read from now on."""
        group = keys.shard(stream_id) if is_cluster(self.redis) else 0
        reader = self.readers.get(group)
        if reader is None:
            reader = self.readers[group] = ShardReader(self.redis, self.log, stream_id)
        return reader.follow(stream_id)

    def close(self) -> None:
        """Worker shutdown: stop reading (followers end with their connections)."""
        for reader in self.readers.values():
            reader.close()


class ShardReader:
    """The reader of one shard's logs (of every log off a cluster): one greenlet, one
    connection, one ``XREAD`` on all of them."""

    def __init__(self, redis_client: redis.Redis, log: EventLog, sample_id: str):
        self.redis = redis_client
        self.log = log
        self._route = keys.events(sample_id)  # any log of the shard: where to connect
        self.streams: dict[str, RemoteStream] = {}
        self._fresh = False  # streams added since the last read began
        self._blocked = False  # an XREAD BLOCK is on the wire
        self._unblocking = False
        self._client_id: int | None = None
        self._work = gevent.event.Event()
        self._greenlet: gevent.Greenlet | None = None
        self._conn: redis.Redis | None = None

    def follow(self, stream_id: str) -> RemoteStream:
        """The stream's shared state here (attach a follower to it); read from now on."""
        stream = self.streams.get(stream_id)
        if stream is not None:
            return stream
        stream = self.streams[stream_id] = RemoteStream(self, stream_id)
        self._fresh = True
        self._work.set()
        if self._greenlet is None or self._greenlet.dead:
            self._greenlet = gevent.spawn(self._run)
        elif self._blocked and not self._unblocking and self._client_id is not None:
            self._unblock()
        return stream

    def close(self) -> None:
        """Worker shutdown: stop reading (followers end with their connections)."""
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)
        self._drop_connection()

    def drop(self, stream: RemoteStream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]

    def _unblock(self) -> None:
        self._unblocking = True
        try:  # on the node our reader is connected to
            node_client(self.redis, self._route).client_unblock(self._client_id)
        except redis.RedisError as exc:  # the read ends by itself within BLOCK_MS
            logger.debug("log reader unblock failed: %s", exc)
        finally:
            self._unblocking = False

    # -- the reader greenlet ------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        last_housekeeping = 0.0
        while True:
            try:
                if self._conn is None:
                    # One connection of the app's pool (the shard's master's), ours alone.
                    self._conn = dedicated(self.redis, self._route)
                    self._client_id = self._conn.client_id()
                while True:
                    if not self.streams:
                        self._work.clear()
                        self._work.wait()
                    self._read_once()
                    now = time.monotonic()
                    if now - last_housekeeping >= HOUSEKEEPING:
                        last_housekeeping = now
                        self._housekeeping()
                    backoff = 0.1
            except redis.RedisError as exc:
                logger.warning("log reader lost Redis (%s); retrying in %.1fs", exc, backoff)
                self._blocked = False
                self._drop_connection()
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                try:
                    refresh(self.redis)  # on a cluster: a failover may have moved the shard
                except redis.RedisError as err:
                    logger.debug("slot map refresh failed: %s", err)

    def _drop_connection(self) -> None:
        conn, self._conn, self._client_id = self._conn, None, None
        if conn is not None:
            try:
                conn.close()
            except redis.RedisError:
                pass

    def _read_once(self) -> None:
        wanted = {keys.events(s.stream_id): s for s in self.streams.values() if not s.done}
        if not wanted:
            self._work.clear()
            self._work.wait(HOUSEKEEPING)
            return
        block = None if self._fresh else BLOCK_MS
        self._fresh = False
        ids = {key: f"0-{stream.cursor}" for key, stream in wanted.items()}
        self._blocked = block is not None
        try:
            reply = self._conn.xread(ids, count=COUNT, block=block)
        finally:
            self._blocked = False
        for key, entries in reply or ():
            stream = wanted.get(key.decode() if isinstance(key, bytes) else key)
            if stream is not None:
                stream.add(entries)
                if len(entries) >= COUNT:
                    self._fresh = True  # more to read: do not block next time

    def _housekeeping(self) -> None:
        streams = [s for s in self.streams.values() if not s.done]
        if not streams:
            return
        pipe = self.redis.pipeline(transaction=False)
        exists_at = []
        for stream in streams:
            self.log.touch_watch(pipe, stream.stream_id)
            exists_at.append(len(pipe))
            pipe.exists(keys.registry(stream.stream_id))
        replies = pipe.execute()
        for stream, at in zip(streams, exists_at, strict=True):
            if not replies[at]:  # its worker died and its entry expired
                stream.end()
