"""The app's one Redis client, from ``REDIS_URL``.

``redis://``, ``rediss://`` and ``unix://`` URLs go to redis-py as they are.
``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`` asks
those Sentinels for the current master of ``service`` and follows failovers
(the same scheme flask-limiter's storage understands). Redis Cluster is not
supported: the cancel bus uses pub/sub and the slot script keys across streams.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.sentinel import Sentinel

__all__ = ["SENTINEL_SCHEME", "connect"]

SENTINEL_SCHEME = "redis+sentinel://"


def connect(url: str, **options: Any) -> redis.Redis:
    if not url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(url, **options)
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
    return sentinel.master_for(path[0], db=db, password=password, **options)
