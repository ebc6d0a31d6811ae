"""Concurrency slots: at most ``MAX_CONCURRENT_STREAMS`` live generations per client.

A sorted set ``sluice:slots:<client>`` per client (IP, or key in authenticated
mode), member = stream id, score = lease expiry. A slot is taken atomically
(Lua) before a stream starts, renewed by the owning worker's tick, and
released in the generation's ``finally``; a killed worker's leases simply
expire, so slots never leak. Counted in Redis: every worker and host agrees.
"""

from __future__ import annotations

import time

import redis

__all__ = ["Slots"]

_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class Slots:
    """Leases on live generations per client, shared by every worker and host."""

    def __init__(self, redis_client: redis.Redis, limit: int, lease_seconds: int):
        self.redis = redis_client
        self.limit = limit
        self.lease = lease_seconds
        self._acquire = redis_client.register_script(_ACQUIRE)

    @staticmethod
    def key(client: str) -> str:
        return f"sluice:slots:{client}"

    def acquire(self, client: str, stream_id: str) -> bool:
        now = time.time()
        args = [now, now + self.lease, self.limit, stream_id, self.lease * 2]
        return bool(self._acquire(keys=[self.key(client)], args=args))

    def renew(self, pipe: redis.client.Pipeline, client: str, stream_id: str) -> None:
        # plain ZADD: after a Redis restart the lease is taken again
        pipe.zadd(self.key(client), {stream_id: time.time() + self.lease})
        pipe.expire(self.key(client), self.lease * 2)

    def release(self, pipe: redis.client.Pipeline, client: str, stream_id: str) -> None:
        pipe.zrem(self.key(client), stream_id)
