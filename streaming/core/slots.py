"""Concurrency slots: at most ``MAX_CONCURRENT_STREAMS`` live generations per client.

A sorted set ``sluice:slots:{c:<client>}`` per client (IP, or key in authenticated
mode), member = stream id, score = lease expiry. A slot is taken atomically
before a stream starts, by the client's script of the admission in
`streaming.core.registry` (budget and slot; then session lease and registry
entry, in the same round trip), renewed by the owning
worker's tick, and released in the generation's ``finally``; a killed worker's leases simply
expire, so slots never leak. Counted in Redis: every worker and host agrees.
"""

from __future__ import annotations

import time

import redis

from streaming.core import keys

__all__ = ["SLOT_LUA", "Slots"]


# Slots in Lua, for the admission script (`streaming.core.registry`), which runs them
# atomically with the other parts of admission. The layout is ours: a sorted set,
# member = stream id, score = lease expiry; expired leases are dropped first.
SLOT_LUA = """
local function slot_free(key, now, limit)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key) < tonumber(limit)
end
local function add_slot(key, expiry, stream_id, key_ttl)
  redis.call('ZADD', key, expiry, stream_id)
  redis.call('EXPIRE', key, key_ttl)
end
"""


class Slots:
    """Leases on live generations per client, shared by every worker and host."""

    def __init__(self, limit: int, lease_seconds: int):
        self.limit = limit
        self.lease = lease_seconds

    @staticmethod
    def key(client: str) -> str:
        return keys.slots(client)

    def renew(self, pipe: redis.client.Pipeline, client: str, stream_id: str) -> None:
        # plain ZADD: after a Redis restart the lease is taken again
        pipe.zadd(self.key(client), {stream_id: time.time() + self.lease})
        pipe.expire(self.key(client), self.lease * 2)

    def release(self, pipe: redis.client.Pipeline, client: str, stream_id: str) -> None:
        pipe.zrem(self.key(client), stream_id)
