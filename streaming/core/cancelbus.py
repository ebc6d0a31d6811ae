"""The cancel bus: a DELETE on any worker or host stops a generation running on another.

Flow. DELETE (any worker) sets the flag ``cancel:{T}S`` and publishes S on its
shard's channel ``cancel:{T}`` (`streaming.core.keys`). The listener of every
worker receives it; the owning worker stops its generation, whose ``finally``
closes the upstream and, in its final pipeline, publishes ``S reason`` on
``ack:{T}`` (`acknowledge`). The DELETE's own worker listens on that channel
too and wakes the waiting DELETE, which answers ``cancelled`` only then.
Waiting holds no Redis connection: one listener per worker serves every
waiting DELETE and every cancel.

One bus, two transports (`Channels`). On a Redis Cluster of Redis >= 7 it is
sharded pub/sub: SPUBLISH goes to the master of the channel's slot only, and
every worker holds one SSUBSCRIBE connection per master (subscribed to the
channels of the shards that master serves). Elsewhere (a single Redis,
Sentinel, a cluster older than 7) classic PUBLISH/SUBSCRIBE on one connection
(a cluster broadcasts it to every node). A failover or a slot move ends a
sharded subscription (the connection drops, or Redis sends ``sunsubscribe``):
the listener learns the slot map again and subscribes anew.

Pub/sub drops messages while a listener reconnects, so: the listener
re-checks the flags of its local streams on every (re)subscribe
(`check_flags`), the tick checks them too (`streaming.core.upkeep`), and a waiting
DELETE reads the registry entry every `ACK_POLL` seconds (a stream that ended
anyway, or whose worker died, answers then). Fan-out: every worker receives
every cancel and every acknowledgement (a few bytes each; acknowledgements
only for streams that a DELETE elsewhere asked to stop). With sharded pub/sub
a message crosses only its shard (its master and that master's replicas);
classic pub/sub on a cluster crosses every node's cluster bus.
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
from streaming.redis_conn import is_cluster, node_client, refresh, sharded_pubsub

__all__ = ["CancelBus", "Channels"]

logger = logging.getLogger(__name__)

ACK_POLL = 0.5
CANCEL_WAIT_MAX = 15.0
BACKOFF_MAX = 2.0


class Channels:
    """The bus's transport: which publish command, and the subscriptions to hold."""

    def __init__(self, redis_client: redis.Redis):
        self.redis = redis_client
        self._sharded: bool | None = None  # asked of the server on first use

    @property
    def sharded(self) -> bool:
        if self._sharded is None:
            self._sharded = sharded_pubsub(self.redis)
        return self._sharded

    def publish(self, pipe: redis.client.Pipeline, channel: str, message: str) -> None:
        try:
            sharded = self.sharded
        except redis.RedisError:  # not known yet, and Redis is away: the flag will do
            sharded = False
        pipe.execute_command("SPUBLISH" if sharded else "PUBLISH", channel, message)

    def subscribe(self) -> list[redis.client.PubSub]:
        """Subscribe to every shard's channels; the pubsubs to read (one per connection)."""
        shards = [keys.shard_channels(k) for k in range(keys.SHARDS)]
        if not self.sharded:
            pubsub = node_client(self.redis, shards[0][0]).pubsub()
            pubsub.subscribe(*(c for pair in shards for c in pair))
            return [pubsub]
        by_node: dict[str, tuple[redis.Redis, list]] = {}
        for pair in shards:
            node = node_client(self.redis, pair[0])
            kwargs = node.connection_pool.connection_kwargs
            name = f"{kwargs.get('host')}:{kwargs.get('port')}"
            by_node.setdefault(name, (node, []))[1].append(pair)
        pubsubs = []
        try:
            for node, pairs in by_node.values():
                pubsub = node.pubsub()
                pubsubs.append(pubsub)
                for pair in pairs:  # one SSUBSCRIBE per slot
                    pubsub.ssubscribe(*pair)
        except BaseException:
            for pubsub in pubsubs:
                pubsub.close()
            raise
        return pubsubs


class CancelBus:
    def __init__(self, redis_client: redis.Redis, registry: Registry, local: dict[str, Generation]):
        self.redis = redis_client
        self.registry = registry
        self.local = local  # this worker's generations
        self.channels = Channels(redis_client)
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
            self.channels.publish(pipe, keys.cancel_channel(stream_id), stream_id)
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
            self.channels.publish(
                pipe, keys.ack_channel(gen.stream_id), f"{gen.stream_id} {gen.reason or 'error'}"
            )
        pipe.delete(keys.cancel_flag(gen.stream_id))

    # -- the listener ---------------------------------------------------------------------

    def listen(self) -> None:
        """One greenlet per worker: cancels for its streams, acknowledgements for its DELETEs."""
        backoff = 0.1
        while True:
            pubsubs: list[redis.client.PubSub] = []
            readers: list[gevent.Greenlet] = []
            try:
                pubsubs = self.channels.subscribe()
                self.check_flags()  # cancels published while we were not subscribed
                backoff = 0.1
                readers = [gevent.spawn(self._read, pubsub) for pubsub in pubsubs]
                for ended in gevent.wait(readers, count=1):
                    raise ended.get()  # the error that ended it
            except redis.RedisError as exc:
                logger.warning("cancel listener lost Redis (%s); retrying in %.1fs", exc, backoff)
                gevent.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                if is_cluster(self.redis):
                    try:
                        refresh(self.redis)  # a failover moved the shards: learn where
                    except redis.RedisError as err:
                        logger.debug("slot map refresh failed: %s", err)
            finally:
                gevent.killall(readers, block=True, timeout=1.0)
                for pubsub in pubsubs:
                    pubsub.close()

    def _read(self, pubsub: redis.client.PubSub) -> redis.RedisError:
        """Read one subscription until it ends: its error (a lost node, a shard that moved)."""
        try:
            self._dispatch(pubsub)
        except redis.RedisError as exc:
            return exc
        return redis.ConnectionError("subscription ended")

    def _dispatch(self, pubsub: redis.client.PubSub) -> None:
        pinged = False  # a quiet subscription is pinged: a node gone silent is noticed
        while True:
            message = pubsub.get_message(timeout=5.0)
            if not message:
                if pinged:
                    raise redis.ConnectionError("the cancel bus's node stopped answering")
                pubsub.ping()
                pinged = True
                continue
            kind = message["type"]
            if kind == "pong":
                pinged = False
            elif kind == "sunsubscribe":  # Redis dropped a shard: its slot moved
                raise redis.ConnectionError("a shard of the cancel bus moved")
            elif kind not in ("message", "smessage"):
                continue
            elif message["channel"].startswith(b"sluice:ack:"):
                self._acknowledged(message["data"])
            else:
                self.stop_local([message["data"].decode()])

    def check_flags(self) -> None:
        ids = list(self.local)
        if ids:
            pipe = self.redis.pipeline(transaction=False)  # one GET per key: any slots
            for sid in ids:
                pipe.get(keys.cancel_flag(sid))
            flags = pipe.execute()
            self.stop_local([sid for sid, flag in zip(ids, flags, strict=True) if flag])

    def _acknowledged(self, message: bytes) -> None:
        stream_id, _, reason = message.decode().partition(" ")
        for ack in self._waiters.get(stream_id, ()):
            ack.set(reason)
