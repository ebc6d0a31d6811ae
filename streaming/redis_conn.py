"""The app's one Redis client, from ``REDIS_URL``.

``redis://``, ``rediss://`` and ``unix://`` URLs go to redis-py as they are.
``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`` asks
those Sentinels for the current master of ``service`` and follows failovers
(the same scheme flask-limiter's storage understands). Redis Cluster is not
supported: the cancel bus uses pub/sub and the slot script keys across streams.

Connections per worker process are bounded by `MAX_CONNECTIONS`, whatever the
number of streams and followers: the cancel listener holds one, the log reader
(`streaming.core.logreader`) one, and every other command borrows one for its round
trip. A command that finds all of them busy waits up to `POOL_WAIT` seconds
for one (a blocking pool), then fails like an unreachable Redis (503). With
Sentinel the pool does not wait: past the bound a command fails at once.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

__all__ = ["SENTINEL_SCHEME", "RedisGate", "connect"]

SENTINEL_SCHEME = "redis+sentinel://"
MAX_CONNECTIONS = 64
POOL_WAIT = 2.0


def connect(url: str, **options: Any) -> redis.Redis:
    if not url.startswith(SENTINEL_SCHEME):
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT, **options
        )
        client = redis.Redis(connection_pool=pool)
        client.auto_close_connection_pool = True  # as from_url does: close() closes the pool
        return client
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    hosts = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        hosts.append((host or item, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a redis+sentinel:// URL names the service: .../<service>[/<db>]")
    db = int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(
        hosts,
        socket_timeout=options.get("socket_timeout"),
        socket_connect_timeout=options.get("socket_connect_timeout"),
    )
    return sentinel.master_for(
        path[0], db=db, password=password, max_connections=MAX_CONNECTIONS, **options
    )


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
