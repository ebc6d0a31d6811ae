"""The cancel bus: a DELETE on any worker or host stops a generation running on another.

Flow. DELETE (any worker) sets the flag ``cancel:S`` and publishes S on
``sluice:cancel`` (`streaming.core.keys`). The one listener greenlet of every
worker receives it; the owning worker stops its generation, whose ``finally``
closes the upstream and, in its final pipeline, publishes ``S reason`` on
``sluice:ack`` (`acknowledge`). The DELETE's own worker listens on that channel
too and wakes the waiting DELETE, which answers ``cancelled`` only then.
Waiting holds no Redis connection: one listener per worker serves every
waiting DELETE and every cancel.

Pub/sub drops messages while a listener reconnects, so: the listener
re-checks the flags of its local streams on every (re)subscribe
(`check_flags`), the tick checks them too (`streaming.core.upkeep`), and a waiting
DELETE reads the registry entry every `ACK_POLL` seconds (a stream that ended
anyway, or whose worker died, answers then). Fan-out: every worker receives
every cancel and every acknowledgement (a few bytes each; acknowledgements
only for streams that a DELETE elsewhere asked to stop).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import gevent
import gevent.event
import redis

from streaming.core import keys
from streaming.core.generation import Generation, StreamStopped
from streaming.core.registry import LIVE_TTL, Registry

__all__ = ["CancelBus"]

logger = logging.getLogger(__name__)

ACK_POLL = 0.5
CANCEL_WAIT_MAX = 15.0


class CancelBus:
    def __init__(self, redis_client: redis.Redis, registry: Registry, local: dict[str, Generation]):
        self.redis = redis_client
        self.registry = registry
        self.local = local  # this worker's generations
        self._asked: set[str] = set()  # local streams a DELETE elsewhere waits on
        self._waiters: dict[str, set[gevent.event.AsyncResult]] = {}

    # -- the DELETE's side ----------------------------------------------------------------

    def cancel_remote(self, stream_id: str, owner: str) -> str:
        """Stop a stream that runs elsewhere; 'cancelled' or 'finished' once it ended."""
        ack = gevent.event.AsyncResult()
        self._waiters.setdefault(stream_id, set()).add(ack)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(keys.cancel_flag(stream_id), "1", ex=LIVE_TTL * 2)
            pipe.publish(keys.CANCEL_CHANNEL, stream_id)
            pipe.execute()
            started = time.monotonic()
            while True:
                reason = ack.wait(ACK_POLL)  # None: no acknowledgement yet
                if reason is not None:
                    return "cancelled" if reason == "cancelled" else "finished"
                info = self.registry.info(stream_id, owner)
                if info is None or info["state"] == "finished":
                    return "cancelled" if info and info.get("reason") == "cancelled" else "finished"
                if self.registry.worker_dead(info["worker"], time.monotonic() - started):
                    self.registry.bury(stream_id, info)
                    return "finished"
                if time.monotonic() - started > CANCEL_WAIT_MAX:
                    raise TimeoutError(f"stream {stream_id}: cancel not acknowledged")
        finally:
            waiters = self._waiters.get(stream_id)
            if waiters is not None:
                waiters.discard(ack)
                if not waiters:
                    del self._waiters[stream_id]

    # -- the owner's side -----------------------------------------------------------------

    def stop_local(self, stream_ids: Iterable[str]) -> None:
        for stream_id in stream_ids:
            gen = self.local.get(stream_id)
            if gen is not None:
                self._asked.add(stream_id)
                gen.stop(StreamStopped("cancelled"))

    def flagged(self, pipe: redis.client.Pipeline, stream_id: str) -> None:
        """Queue the check of a stream's cancel flag (the tick's fallback for lost messages)."""
        pipe.exists(keys.cancel_flag(stream_id))

    def acknowledge(self, pipe: redis.client.Pipeline, gen: Generation) -> None:
        """In the generation's final pipeline: tell a waiting DELETE, drop the flag."""
        if gen.stream_id in self._asked:
            self._asked.discard(gen.stream_id)
            pipe.publish(keys.ACK_CHANNEL, f"{gen.stream_id} {gen.reason or 'error'}")
        pipe.delete(keys.cancel_flag(gen.stream_id))

    # -- the listener ---------------------------------------------------------------------

    def listen(self) -> None:
        """One greenlet per worker: cancels for its streams, acknowledgements for its DELETEs."""
        backoff = 0.1
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL, keys.ACK_CHANNEL)
                self.check_flags()  # cancels published while we were not subscribed
                backoff = 0.1
                while True:
                    message = pubsub.get_message(timeout=5.0)
                    if not message or message["type"] != "message":
                        continue
                    if message["channel"] == keys.ACK_CHANNEL.encode():
                        self._acknowledged(message["data"])
                    else:
                        self.stop_local([message["data"].decode()])
            except redis.RedisError as exc:
                logger.warning("cancel listener lost Redis (%s); retrying in %.1fs", exc, backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                pubsub.close()

    def check_flags(self) -> None:
        ids = list(self.local)
        if ids:
            flags = self.redis.mget([keys.cancel_flag(sid) for sid in ids])
            self.stop_local([sid for sid, flag in zip(ids, flags, strict=True) if flag])

    def _acknowledged(self, message: bytes) -> None:
        stream_id, _, reason = message.decode().partition(" ")
        for ack in self._waiters.get(stream_id, ()):
            ack.set(reason)
