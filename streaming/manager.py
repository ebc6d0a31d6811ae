"""StreamManager: the Redis registry of live streams, the cancel bus, the event log.

Keys (all under ``sluice:``), for stream id S:

- ``stream:S``  hash ``owner worker state reason created model session_id``;
  TTL `LIVE_TTL` while running, refreshed every `TICK` by the owning worker,
  so a crashed worker's streams expire; ``STREAM_RETENTION_SECONDS`` once
  finished.
- ``events:S``  the event log (see `streaming.eventlog`).
- ``cancel:S``  flag set by DELETE; ``watch:S`` set by followers on other
  workers; ``worker:W`` liveness of worker W. (Every key: `streaming.keys`.)

Cross-worker cancel. DELETE (any worker, any host) sets ``cancel:S`` and
publishes S on ``sluice:cancel``; the one listener greenlet of the owning
worker stops the generation, whose ``finally`` closes the upstream and, in its
final pipeline, publishes ``S reason`` on ``sluice:ack``. The one listener of
the DELETE's worker (subscribed to both channels) wakes the waiting DELETE,
which answers ``cancelled`` only then: waiting holds no Redis connection. Pub/sub loses
messages while a listener reconnects, so the listener re-checks the flags of
its local streams on every (re)subscribe, the `TICK` loop checks them too,
and a waiting DELETE reads the registry entry every `ACK_POLL` seconds.

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
import gevent.event
import redis

from streaming import keys
from streaming.errors import ApiError
from streaming.eventlog import EventLog
from streaming.generation import Generation, GenerationRequest, StreamStopped
from streaming.logreader import LogReader
from streaming.sessions import SessionStore
from streaming.slots import Slots
from streaming.upstream import Upstream

__all__ = ["RedisGate", "StreamManager", "new_stream_id", "valid_stream_id"]

logger = logging.getLogger(__name__)

TICK = 2.0
LIVE_TTL = 20
WORKER_TTL = 6  # three missed ticks
ACK_POLL = 0.5
STOP_CANCEL_WAIT = 5.0
CANCEL_WAIT_MAX = 15.0
_ID_CHARS = frozenset("0123456789abcdef")


# Admission, one round trip: a concurrency slot, the session's lease (when the
# stream continues a session) and the registry entry, all or nothing.
# KEYS: slots, registry entry, session lease ("" for none).
# ARGV: now, slot expiry, slot limit, stream id, slots key TTL, LIVE_TTL, field, value, ...
# Returns 1 (admitted), 0 (no free slot) or -1 (the session is generating already).
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
if KEYS[3] ~= '' and not redis.call('SET', KEYS[3], ARGV[4], 'NX', 'EX', ARGV[6]) then
  return -1
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('HSET', KEYS[2], unpack(ARGV, 7))
redis.call('EXPIRE', KEYS[2], ARGV[6])
return 1
"""

_REGISTER_MISSING = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


def new_stream_id() -> str:
    return "st_" + secrets.token_hex(16)


def valid_stream_id(stream_id: str) -> bool:
    return len(stream_id) == 35 and stream_id.startswith("st_") and set(stream_id[3:]) <= _ID_CHARS


class RedisGate:
    """Fail fast while Redis is known to be away.

    After a Redis error, requests that need Redis get 503 at once for
    `COOLDOWN` seconds instead of each waiting out a socket timeout on a dead
    or frozen server; then the next request tries Redis again.
    """

    COOLDOWN = 2.0

    def __init__(self) -> None:
        self._down_until = 0.0

    def failed(self) -> None:
        self._down_until = time.monotonic() + self.COOLDOWN

    def recovered(self) -> None:
        self._down_until = 0.0

    def is_open(self) -> bool:
        return time.monotonic() < self._down_until


class StreamManager:
    def __init__(self, redis_client: redis.Redis, settings, upstream: Upstream):
        self.redis = redis_client
        self.settings = settings
        self.upstream = upstream
        self._admit = redis_client.register_script(_ADMIT)
        self._register_missing = redis_client.register_script(_REGISTER_MISSING)
        self.slots = Slots(settings.max_concurrent_streams, LIVE_TTL)
        self.sessions = SessionStore(
            redis_client, settings.session_ttl_seconds, settings.session_max_messages
        )
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.local: dict[str, Generation] = {}  # this worker's generations (Redis is the registry)
        self.log = EventLog(redis_client, self.worker_id, LIVE_TTL)
        self.reader = LogReader(redis_client, self.log)  # followers of other workers' streams
        self._cancel_asked: set[str] = set()  # local streams a DELETE elsewhere waits on
        self._ack_waiters: dict[str, set[gevent.event.AsyncResult]] = {}
        self.gate = RedisGate()
        self._loops: list[gevent.Greenlet] = []

    # -- lifecycle ------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if not self._loops:
            self._loops = [
                gevent.spawn(f)
                for f in (self._listen, self._tick_loop, self.log.flush_loop, self._watchdog)
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
        self.reader.close()

    # -- starting and finishing -------------------------------------------------------

    def start(self, request: GenerationRequest) -> Generation:
        """Admit the stream (slot, session lease, registry entry: one Redis round trip;
        RedisError here means 503), then start its reader."""
        self._ensure_running()
        now = time.time()
        slots = self.slots
        session_key = self.sessions.live_key(request.session_id) if request.session_id else ""
        fields = self._fields(request, now)
        args = [now, now + slots.lease, slots.limit, request.stream_id, slots.lease * 2, LIVE_TTL]
        args += [item for pair in fields.items() for item in pair]
        admitted = self._admit(
            keys=[slots.key(request.client), keys.registry(request.stream_id), session_key],
            args=args,
        )
        if admitted == 0:
            raise ApiError(
                429,
                "too_many_streams",
                f"At most {slots.limit} live streams per client; wait for one to end.",
            )
        if admitted == -1:
            raise ApiError(409, "session_busy", "This session is already generating an answer.")
        gen = Generation(self, request)
        self.local[request.stream_id] = gen
        gen.greenlet = gevent.spawn(gen.run)
        return gen

    def _fields(self, request: GenerationRequest, created: float) -> dict[str, str]:
        return {
            "owner": request.owner,
            "client": request.client,
            "worker": self.worker_id,
            "state": "running",
            "created": f"{created:.3f}",
            "model": request.model,
            "session_id": request.session_id or "",
        }

    def _register_if_missing(self, pipe: redis.client.Pipeline, gen: Generation) -> None:
        # never resurrects an entry its generation just marked finished
        fields = self._fields(gen.request, gen.created)
        args = [LIVE_TTL, *(item for pair in fields.items() for item in pair)]
        self._register_missing(keys=[keys.registry(gen.stream_id)], args=args, client=pipe)

    def finished(self, gen: Generation, error_code: str | None) -> None:
        """Called once from a generation's `finally`, after its `done` event."""
        self.local.pop(gen.stream_id, None)
        self.log.forget(gen.stream_id)
        retention = self.settings.stream_retention_seconds
        stream_key = keys.registry(gen.stream_id)
        pipe = self.redis.pipeline(transaction=False)
        append = self.log.append(pipe, gen)
        pipe.expire(keys.events(gen.stream_id), retention)
        fields = {
            "state": "finished",
            "reason": gen.reason or "error",
            "ended": f"{time.time():.3f}",
            "events": str(len(gen.frames)),  # the seq of `done` (a GET after it is a 204)
        }
        if error_code:
            fields["error"] = error_code
        pipe.hset(stream_key, mapping=fields)
        pipe.expire(stream_key, retention)
        if gen.stream_id in self._cancel_asked:
            self._cancel_asked.discard(gen.stream_id)
            pipe.publish(keys.ACK_CHANNEL, f"{gen.stream_id} {gen.reason or 'error'}")
        pipe.delete(keys.cancel_flag(gen.stream_id))
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
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            logger.warning("stream %s: final write failed: %s", gen.stream_id, exc)
            return
        if append is not None and not self.log.settle(append, replies[append.at]):
            self.log.write_rest(gen, retention)  # a flush still in flight, or a lost log

    # -- registry and cancel ----------------------------------------------------------

    def info(self, stream_id: str, owner: str) -> dict[str, str] | None:
        """The registry entry, or None when unknown, expired or owned by someone else."""
        raw = self.redis.hgetall(keys.registry(stream_id))
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
        ack = gevent.event.AsyncResult()
        self._ack_waiters.setdefault(stream_id, set()).add(ack)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(keys.cancel_flag(stream_id), "1", ex=LIVE_TTL * 2)
            pipe.publish(keys.CANCEL_CHANNEL, stream_id)
            pipe.execute()
            started = time.monotonic()
            while True:
                reason = ack.wait(ACK_POLL)  # None: no ack yet
                if reason is not None:
                    return "cancelled" if reason == "cancelled" else "finished"
                info = self.info(stream_id, owner)
                if info is None or info["state"] == "finished":
                    return "cancelled" if info and info.get("reason") == "cancelled" else "finished"
                if self._worker_dead(info["worker"], time.monotonic() - started):
                    self._bury(stream_id, info)
                    return "finished"
                if time.monotonic() - started > CANCEL_WAIT_MAX:
                    raise TimeoutError(f"stream {stream_id}: cancel not acknowledged")
        finally:
            waiters = self._ack_waiters.get(stream_id)
            if waiters is not None:
                waiters.discard(ack)
                if not waiters:
                    del self._ack_waiters[stream_id]

    def _worker_dead(self, worker_id: str, waited: float) -> bool:
        """A worker whose liveness key expired (no tick for WORKER_TTL) is gone.

        Only Redis's own expiry is trusted, never another host's clock. A missing
        key counts once we waited longer than a tick: after a Redis restart every
        live worker writes its key again within TICK seconds.
        """
        return waited > TICK + 0.5 and not self.redis.exists(keys.worker(worker_id))

    def _bury(self, stream_id: str, info: dict[str, str]) -> None:
        """Record the end of a stream whose worker died, and free its slot."""
        logger.warning(
            "stream %s: worker %s is gone; marking it finished", stream_id, info["worker"]
        )
        retention = self.settings.stream_retention_seconds
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            keys.registry(stream_id),
            mapping={"state": "finished", "reason": "error", "error": "worker_lost"},
        )
        pipe.expire(keys.registry(stream_id), retention)
        self.slots.release(pipe, info.get("client", ""), stream_id)
        if info.get("session_id"):
            pipe.delete(self.sessions.live_key(info["session_id"]))
        pipe.execute()

    def _stop_local(self, stream_ids: Iterator[str] | list[str]) -> None:
        for stream_id in stream_ids:
            gen = self.local.get(stream_id)
            if gen is not None:
                self._cancel_asked.add(stream_id)
                gen.stop(StreamStopped("cancelled"))

    def _acknowledged(self, message: bytes) -> None:
        stream_id, _, reason = message.decode().partition(" ")
        for ack in self._ack_waiters.get(stream_id, ()):
            ack.set(reason)

    def _listen(self) -> None:
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL, keys.ACK_CHANNEL)
                self._check_flags()  # cancels published while we were not subscribed
                backoff = 0.1
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if not message or message["type"] != "message":
                        continue
                    if message["channel"] == keys.ACK_CHANNEL.encode():
                        self._acknowledged(message["data"])
                    else:
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
            flags = self.redis.mget([keys.cancel_flag(sid) for sid in ids])
            self._stop_local([sid for sid, flag in zip(ids, flags, strict=True) if flag])

    def _watchdog(self) -> None:
        """Stop generations whose upstream sent nothing for UPSTREAM_TIMEOUT_SECONDS."""
        timeout = self.settings.upstream_timeout_seconds
        period = min(1.0, timeout / 10)
        while True:
            gevent.sleep(period)
            deadline = time.monotonic() - timeout
            for gen in list(self.local.values()):
                if gen.last_read < deadline:
                    gen.upstream_silent()

    def _tick_loop(self) -> None:
        while True:
            try:
                self._tick()
                self.gate.recovered()
            except redis.RedisError as exc:
                self.gate.failed()
                logger.warning("registry refresh failed: %s", exc)
            gevent.sleep(TICK)

    def _tick(self) -> None:
        """Keep this worker's registry entries and leases alive; catch cancel flags.

        Entries a restarted Redis lost are written again (EXPIRE answers 0).
        """
        gens = list(self.local.values())
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(keys.worker(self.worker_id), "1", ex=WORKER_TTL)
        at = []  # per generation: the index of its EXISTS cancel flag reply (EXPIRE's next)
        for gen in gens:
            request = gen.request
            at.append(len(pipe))
            pipe.exists(keys.cancel_flag(gen.stream_id))
            pipe.expire(keys.registry(gen.stream_id), LIVE_TTL)
            pipe.expire(keys.events(gen.stream_id), LIVE_TTL)
            self.slots.renew(pipe, request.client, gen.stream_id)
            if request.session_id:
                self.sessions.renew(pipe, request.session_id, gen.stream_id, LIVE_TTL)
        replies = pipe.execute()
        lost = self.redis.pipeline(transaction=False)
        cancelled = []
        for gen, i in zip(gens, at, strict=True):
            flagged, alive = replies[i], replies[i + 1]
            if flagged:
                cancelled.append(gen.stream_id)
            if not alive and not gen.done:
                self._register_if_missing(lost, gen)
        for gen in gens:
            if gen.done:  # ended while we renewed: do not leave its leases behind
                self.slots.release(lost, gen.request.client, gen.stream_id)
                if gen.request.session_id:
                    self.sessions.release_if_held(lost, gen.request.session_id, gen.stream_id)
        if len(lost):
            lost.execute()
        self._stop_local(cancelled)
