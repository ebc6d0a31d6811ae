"""The app's one Redis client, from ``REDIS_URL``.

``redis://``, ``rediss://`` and ``unix://`` URLs go to redis-py as they are.
``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]`` asks
those Sentinels for the current master of ``service`` and follows failovers
(the same scheme flask-limiter's storage understands).
``redis+cluster://[[user]:password@]host:port[,host:port...]`` is Redis
Cluster: a `ClusterClient` (redis-py's ``RedisCluster``) that learns the slot
map from any of those nodes and refreshes it on ``MOVED`` and on connection
errors, so a promoted replica is found without a restart. The key layout that
makes every operation single-slot is `streaming.core.keys`.

Connections per worker process are bounded by `MAX_CONNECTIONS` (per node on
a cluster), whatever the number of streams and followers: the cancel listener
holds one (one per master on a cluster, sharded pub/sub), the log reader
(`streaming.core.logreader`) one (one per stream shard with followers, at most
`streaming.core.keys.SHARDS`, on a cluster), and every other command borrows
one for its round trip. A command that finds all of them busy waits up to
`POOL_WAIT` seconds for one (a blocking pool), then fails like an unreachable
Redis (503). With Sentinel the pool does not wait: past the bound a command
fails at once.

Cluster errors are Redis being unavailable. redis-py raises a few of them as
``RedisClusterException``, which is no ``RedisError`` (no reachable node while
refreshing the map, an uncovered slot); `ClusterClient` raises those as
`ClusterUnavailable` (a ``redis.ConnectionError``), so every ``except
RedisError`` of the core and the 503 handler of the web layer cover them.
``ClusterDownError``, ``TryAgainError`` and ``MovedError`` (after redis-py's
own redirections) are ``RedisError`` already.

Pipelines hold scripts by ``execute_command("EVAL"/"EVALSHA", ...)`` (`script`):
redis-py's cluster pipeline refuses its ``evalsha``/``publish`` methods, and
would ask the server for an EVAL's keys (``COMMAND GETKEYS``, one round trip per
script) unless told that EVAL is routed by its first key (`_KeyedScripts`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.policies import PolicyResolver, StaticPolicyResolver
from redis.exceptions import RedisClusterException
from redis.sentinel import Sentinel

__all__ = [
    "CLUSTER_SCHEME",
    "SENTINEL_SCHEME",
    "ClusterClient",
    "ClusterUnavailable",
    "RedisGate",
    "cluster_nodes",
    "connect",
    "dedicated",
    "is_cluster",
    "node_client",
    "refresh",
    "script",
    "sharded_pubsub",
]

SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
MAX_CONNECTIONS = 64
POOL_WAIT = 2.0


class ClusterUnavailable(redis.ConnectionError):
    """A cluster error that redis-py raises outside ``RedisError``: Redis is unavailable."""


def connect(url: str, **options: Any) -> redis.Redis:
    if url.startswith(CLUSTER_SCHEME):
        return _cluster(url, options)
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


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis+cluster://[auth@]h:p[,h:p]`` -> (``redis://[auth@]h:p`` of the first, every node)."""
    parts = urlsplit(url)
    auth, _, netloc = parts.netloc.rpartition("@")
    nodes = []
    for item in netloc.split(","):
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        nodes.append((host or item, int(port or 6379)))
    if not nodes or not nodes[0][0]:
        raise ValueError("a redis+cluster:// URL names at least one node: host:port[,host:port]")
    first = f"redis://{auth + '@' if auth else ''}{nodes[0][0]}:{nodes[0][1]}"
    return first, nodes


def _cluster(url: str, options: dict[str, Any]) -> ClusterClient:
    first, nodes = cluster_nodes(url)
    options = dict(options)
    options.pop("health_check_interval", None)  # not passed to the nodes by redis-py
    return ClusterClient(
        url=first,  # a URL: the nodes get the pool class below (a blocking, bounded pool)
        startup_nodes=[ClusterNode(host, port) for host, port in nodes[1:]],
        connection_pool_class=redis.BlockingConnectionPool,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT,
        policy_resolver=_KeyedScripts(),
        **options,
    )


class _KeyedScripts(PolicyResolver):
    """EVAL and EVALSHA go to the node of their first key (redis-py's own slot rule for
    them); without this its cluster pipeline asks a node for their keys first."""

    def __init__(self, fallback: PolicyResolver | None = None):
        from redis._parsers.commands import CommandPolicies, RequestPolicy, ResponsePolicy

        self._fallback = fallback or StaticPolicyResolver()
        self._keyed = CommandPolicies(
            request_policy=RequestPolicy.DEFAULT_KEYED,
            response_policy=ResponsePolicy.DEFAULT_KEYED,
        )

    def resolve(self, command_name: str):
        if command_name in ("eval", "evalsha"):
            return self._keyed
        return self._fallback.resolve(command_name)

    def with_fallback(self, fallback: PolicyResolver) -> PolicyResolver:
        return _KeyedScripts(fallback)


class ClusterClient(RedisCluster):
    """redis-py's ``RedisCluster``; its pipelines route scripts by key, and a cluster
    error outside ``RedisError`` is raised as `ClusterUnavailable`."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().execute_command(*args, **kwargs)
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _Pipeline(
            nodes_manager=self.nodes_manager,
            commands_parser=self.commands_parser,
            startup_nodes=self.nodes_manager.startup_nodes,
            result_callbacks=self.result_callbacks,
            cluster_response_callbacks=self.cluster_response_callbacks,
            read_from_replicas=self.read_from_replicas,
            load_balancing_strategy=self.load_balancing_strategy,
            reinitialize_steps=self.reinitialize_steps,
            retry=self.retry,
            lock=self._lock,
            transaction=transaction,
            policy_resolver=self._policy_resolver,
            event_dispatcher=self._event_dispatcher,
        )


class _Pipeline(ClusterPipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        try:
            return super().execute(raise_on_error)
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc


def is_cluster(client: Any) -> bool:
    return isinstance(client, RedisCluster)


def script(pipe: Any, source: str, keys: Sequence[str], args: Sequence[Any]) -> None:
    """Queue a script (EVAL: no NOSCRIPT after a restart or a failover) on a pipeline
    of either kind; every key in one slot."""
    pipe.execute_command("EVAL", source, len(keys), *keys, *args)


def refresh(client: Any) -> None:
    """Learn the cluster's slot map again (after an error on a connection of our own)."""
    if is_cluster(client):
        try:
            client.nodes_manager.initialize()
        except RedisClusterException as exc:
            raise ClusterUnavailable(str(exc)) from exc
        except redis.RedisError:
            raise


def node_client(client: Any, key: str) -> redis.Redis:
    """The plain client of the node that serves `key` (the client itself off a cluster)."""
    if not is_cluster(client):
        return client
    try:
        node = client.get_node_from_key(key)
    except RedisClusterException as exc:
        raise ClusterUnavailable(str(exc)) from exc
    return client.get_redis_connection(node)


def dedicated(client: Any, key: str) -> redis.Redis:
    """A client holding one connection of its own, to the node that serves `key`
    (a blocking reader, a subscriber); from the app's bounded pool (the node's)."""
    node = node_client(client, key)
    return redis.Redis(connection_pool=node.connection_pool, single_connection_client=True)


def sharded_pubsub(client: Any) -> bool:
    """Use SSUBSCRIBE/SPUBLISH? On a cluster of Redis >= 7 only (a single Redis, or an
    older cluster, broadcasts classic pub/sub to every subscriber anyway)."""
    if not is_cluster(client):
        return False
    info = client.info("server")
    if isinstance(info, dict) and "redis_version" not in info:  # one answer per node
        info = next(iter(info.values()), {})
    version = str(info.get("redis_version", "0"))
    return int(version.split(".")[0] or 0) >= 7


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


def limiter_storage(client: Any, url: str) -> tuple[str, dict[str, Any]] | None:
    """flask-limiter's storage for a cluster: the ``limits`` library's own
    ``redis+cluster://`` storage (it builds its own ``RedisCluster``: it takes no pool),
    bounded like ours. None off a cluster (the limiter shares the app's pool)."""
    if not is_cluster(client):
        return None
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return url, {
        "max_connections": MAX_CONNECTIONS,
        "socket_timeout": 2,
        "socket_connect_timeout": 2,
        "retry": Retry(NoBackoff(), 1),
    }
