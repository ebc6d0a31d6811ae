"""StreamManager: the Redis registry of live streams, the cancel bus, the event log.

Keys (all under ``sluice:``), for stream id S:

- ``stream:S``  hash ``owner worker state reason created model session_id``;
  TTL `LIVE_TTL` while running, refreshed every `TICK` by the owning worker,
  so a crashed worker's streams expire; ``STREAM_RETENTION_SECONDS`` once
  finished.
- ``events:S``  Redis stream: one entry per flushed batch of SSE frames, entry
  id ``0-<last seq in batch>``, fields ``f`` (first seq) and ``d`` (frames).
- ``cancel:S``  flag set by DELETE; ``ack:S`` list the owner pushes its final
  reason to; ``watch:S`` set by followers on other workers;
  ``worker:W`` liveness of worker W.

Cross-worker cancel. DELETE (any worker, any host) sets ``cancel:S`` and
publishes S on ``sluice:cancel``; the one listener greenlet of the owning
worker stops the generation, whose ``finally`` closes the upstream and pushes
the final reason to ``ack:S``; DELETE waits on that list (BLPOP) and answers
``cancelled`` only then. Pub/sub loses messages while a listener reconnects,
so the listener re-checks the flags of its local streams on every
(re)subscribe, and the `TICK` loop checks them too.

Redis outage. At start it is a 503 before any stream begins. Mid-stream the
generation goes on for its local clients; flushes to the event log are kept
and retried, and the registry entry expires on its own if Redis stays away.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Iterator

import gevent
import redis

from streaming.errors import ApiError
from streaming.generation import Generation, GenerationRequest, StreamStopped
from streaming.sessions import SessionStore
from streaming.slots import Slots
from streaming.upstream import Upstream

__all__ = ["StreamManager", "new_stream_id", "valid_stream_id"]

logger = logging.getLogger(__name__)

CANCEL_CHANNEL = "sluice:cancel"
TICK = 2.0
LIVE_TTL = 20
WORKER_TTL = 10
WATCH_TTL = 3
ACK_TTL = 30
FLUSH_INTERVAL = 0.05
LOG_MAXLEN = 10_000
STOP_CANCEL_WAIT = 5.0
_ID_CHARS = frozenset("0123456789abcdef")


def new_stream_id() -> str:
    return "st_" + secrets.token_hex(16)


def valid_stream_id(stream_id: str) -> bool:
    return len(stream_id) == 35 and stream_id.startswith("st_") and set(stream_id[3:]) <= _ID_CHARS


def _key(kind: str, stream_id: str) -> str:
    return f"sluice:{kind}:{stream_id}"


class StreamManager:
    def __init__(self, redis_client: redis.Redis, settings, upstream: Upstream):
        self.redis = redis_client
        self.settings = settings
        self.upstream = upstream
        self.slots = Slots(redis_client, settings.max_concurrent_streams, LIVE_TTL)
        self.sessions = SessionStore(
            redis_client, settings.session_ttl_seconds, settings.session_max_messages
        )
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.local: dict[str, Generation] = {}  # this worker's generations (Redis is the registry)
        self._dirty: dict[str, Generation] = {}
        self._loops: list[gevent.Greenlet] = []

    # -- lifecycle ------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if not self._loops:
            self._loops = [
                gevent.spawn(f) for f in (self._listen, self._tick_loop, self._flush_loop)
            ]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Worker shutdown: end every local stream with an `interrupted` error."""
        generations = list(self.local.values())
        for gen in generations:
            gen.stop(StreamStopped("error", ("interrupted", "The server is restarting.")))
        gevent.joinall([g.greenlet for g in generations if g.greenlet], timeout=timeout)
        for loop in self._loops:
            loop.kill(block=False)
        self._loops = []

    # -- starting and finishing -------------------------------------------------------

    def start(self, request: GenerationRequest) -> Generation:
        """Take a slot, register the stream (RedisError here means 503), start its reader."""
        self._ensure_running()
        if not self.slots.acquire(request.client, request.stream_id):
            raise ApiError(
                429,
                "too_many_streams",
                f"At most {self.slots.limit} live streams per client; wait for one to end.",
            )
        if request.session_id and not self.sessions.claim(
            request.session_id, request.stream_id, LIVE_TTL
        ):
            self._release_quietly(request)
            raise ApiError(409, "session_busy", "This session is already generating an answer.")
        key = _key("stream", request.stream_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            key,
            mapping={
                "owner": request.owner,
                "worker": self.worker_id,
                "state": "running",
                "created": f"{time.time():.3f}",
                "model": request.model,
                "session_id": request.session_id or "",
            },
        )
        pipe.expire(key, LIVE_TTL)
        try:
            pipe.execute()
        except redis.RedisError:
            self._release_quietly(request)
            raise
        gen = Generation(self, request)
        self.local[request.stream_id] = gen
        gen.greenlet = gevent.spawn(gen.run)
        return gen

    def _release_quietly(self, request: GenerationRequest) -> None:
        try:
            pipe = self.redis.pipeline(transaction=False)
            self.slots.release(pipe, request.client, request.stream_id)
            if request.session_id:
                pipe.delete(f"sluice:session:{request.session_id}:live")
            pipe.execute()
        except redis.RedisError:
            pass  # the lease expires by itself

    def finished(self, gen: Generation, error_code: str | None) -> None:
        """Called once from a generation's `finally`, after its `done` event."""
        self.local.pop(gen.stream_id, None)
        self._dirty.pop(gen.stream_id, None)
        retention = self.settings.stream_retention_seconds
        stream_key, ack_key = _key("stream", gen.stream_id), _key("ack", gen.stream_id)
        pipe = self.redis.pipeline(transaction=False)
        self._append_log(pipe, gen)
        pipe.expire(_key("events", gen.stream_id), retention)
        fields = {
            "state": "finished",
            "reason": gen.reason or "error",
            "ended": f"{time.time():.3f}",
        }
        if error_code:
            fields["error"] = error_code
        pipe.hset(stream_key, mapping=fields)
        pipe.expire(stream_key, retention)
        pipe.rpush(ack_key, gen.reason or "error")
        pipe.expire(ack_key, ACK_TTL)
        pipe.delete(_key("cancel", gen.stream_id))
        self.slots.release(pipe, gen.request.client, gen.stream_id)
        if gen.request.session_id:
            interrupted = gen.reason not in ("stop", "length")
            self.sessions.save_turn(
                pipe,
                gen.request.session_id,
                gen.request.new_messages,
                "".join(gen.text),
                interrupted,
            )
        try:
            pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            logger.warning("stream %s: final write failed: %s", gen.stream_id, exc)

    # -- the event log ----------------------------------------------------------------

    def mark_dirty(self, gen: Generation) -> None:
        self._dirty[gen.stream_id] = gen

    def _append_log(self, pipe: redis.client.Pipeline, gen: Generation) -> None:
        first, last = gen.flushed, len(gen.frames)
        if last <= first:
            return
        pipe.xadd(
            _key("events", gen.stream_id),
            {"f": first + 1, "d": b"".join(gen.frames[first:last])},
            id=f"0-{last}",
            maxlen=LOG_MAXLEN,
            approximate=True,
        )
        gen.flushed = last

    def _flush_loop(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            if self._dirty:
                self.flush()

    def flush(self) -> None:
        batch, self._dirty = self._dirty, {}
        before = {sid: gen.flushed for sid, gen in batch.items()}
        pipe = self.redis.pipeline(transaction=False)
        for gen in batch.values():
            self._append_log(pipe, gen)
            pipe.expire(_key("events", gen.stream_id), LIVE_TTL)
        try:
            pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            logger.warning("event log flush failed (%d streams), will retry: %s", len(batch), exc)
            for sid, gen in batch.items():
                if not gen.done:
                    gen.flushed = min(gen.flushed, before[sid])
                    self._dirty[sid] = gen

    def read_log(self, stream_id: str, after: int, block_ms: int | None) -> list[bytes]:
        """Frames with seq > `after` from the Redis log; waits up to `block_ms` for new ones."""
        key = _key("events", stream_id)
        if block_ms is None:
            entries = self.redis.xrange(key, min=f"0-{after + 1}")
        else:
            reply = self.redis.xread({key: f"0-{after}"}, block=block_ms)
            entries = reply[0][1] if reply else []
        frames: list[bytes] = []
        for _entry_id, fields in entries:
            first = int(fields[b"f"])
            batch = fields[b"d"].split(b"\n\n")[:-1]
            frames.extend(frame + b"\n\n" for frame in batch[max(0, after + 1 - first) :])
            after = max(after, first + len(batch) - 1)
        return frames

    def touch_watch(self, stream_id: str) -> None:
        self.redis.set(_key("watch", stream_id), self.worker_id, ex=WATCH_TTL)

    def watched_elsewhere(self, stream_id: str) -> bool:
        try:
            return bool(self.redis.exists(_key("watch", stream_id)))
        except redis.RedisError:
            return False

    # -- registry and cancel ----------------------------------------------------------

    def info(self, stream_id: str, owner: str) -> dict[str, str] | None:
        """The registry entry, or None when unknown, expired or owned by someone else."""
        raw = self.redis.hgetall(_key("stream", stream_id))
        info = {k.decode(): v.decode() for k, v in raw.items()}
        if not info or info.get("owner") != owner:
            return None
        return info

    def cancel(self, stream_id: str, owner: str) -> str | None:
        """Stop a stream wherever it runs: 'cancelled', 'finished', or None (404)."""
        info = self.info(stream_id, owner)
        if info is None:
            return None
        if info["state"] == "finished":
            return "finished"
        gen = self.local.get(stream_id)
        if gen is not None:
            gen.stop(StreamStopped("cancelled"))
            gen.ended.wait(STOP_CANCEL_WAIT)
            return "cancelled" if gen.reason == "cancelled" else "finished"
        self._ensure_running()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(_key("cancel", stream_id), "1", ex=LIVE_TTL * 2)
        pipe.publish(CANCEL_CHANNEL, stream_id)
        pipe.execute()
        ack_key = _key("ack", stream_id)
        deadline = time.monotonic() + STOP_CANCEL_WAIT
        while True:
            reply = self.redis.blpop([ack_key], timeout=1.0)
            if reply is not None:
                return "cancelled" if reply[1] == b"cancelled" else "finished"
            info = self.info(stream_id, owner)
            if info is None or info["state"] == "finished":
                return "cancelled" if info and info.get("reason") == "cancelled" else "finished"
            if not self.redis.exists(f"sluice:worker:{info['worker']}"):
                # Its worker died: the stream ended with it.
                self.redis.hset(
                    _key("stream", stream_id), mapping={"state": "finished", "reason": "error"}
                )
                return "finished"
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream {stream_id}: cancel not acknowledged")

    def _stop_local(self, stream_ids: Iterator[str] | list[str]) -> None:
        for stream_id in stream_ids:
            gen = self.local.get(stream_id)
            if gen is not None:
                gen.stop(StreamStopped("cancelled"))

    def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(CANCEL_CHANNEL)
                self._check_flags()  # cancels published while we were not subscribed
                backoff = 0.1
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if message and message["type"] == "message":
                        self._stop_local([message["data"].decode()])
            except redis.RedisError as exc:
                logger.warning("cancel listener lost Redis (%s); retrying in %.1fs", exc, backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()

    def _check_flags(self) -> None:
        ids = list(self.local)
        if ids:
            flags = self.redis.mget([_key("cancel", sid) for sid in ids])
            self._stop_local([sid for sid, flag in zip(ids, flags, strict=True) if flag])

    def _tick_loop(self) -> None:
        while True:
            try:
                self._tick()
            except redis.RedisError as exc:
                logger.warning("registry refresh failed: %s", exc)
            gevent.sleep(TICK)

    def _tick(self) -> None:
        """Keep this worker's registry entries and leases alive; catch cancel flags."""
        ids = list(self.local)
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(f"sluice:worker:{self.worker_id}", "1", ex=WORKER_TTL)
        flag_at = []
        for sid in ids:
            flag_at.append(len(pipe))
            pipe.exists(_key("cancel", sid))
            pipe.expire(_key("stream", sid), LIVE_TTL)
            request = self.local[sid].request
            self.slots.renew(pipe, request.client, sid)
            if request.session_id:
                self.sessions.renew(pipe, request.session_id, LIVE_TTL)
        replies = pipe.execute()
        self._stop_local([sid for sid, at in zip(ids, flag_at, strict=True) if replies[at]])
