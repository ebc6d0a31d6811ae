"""Per-client protections: rate limits and concurrency slots, both in Redis.

Rate limits: ``RATE_LIMIT_DEFAULT`` is one budget per client IP shared by
every /api and /v1 route; ``RATE_LIMIT_STREAM`` is a second budget for
starting generations. Each is one or more fixed windows (``10/minute``,
``100/minute;1000/hour``), counted in Redis so that every worker and host
agrees. Refusals are 429 ``rate_limited`` with ``Retry-After`` and
``X-RateLimit-*`` headers. Answers that pass carry no such headers: the
refusal is where a client needs them.

One Lua call per request, before anything else of the request runs (an
app-level hook: a request that fails authentication counts too): it counts
every window that applies (both budgets for a generation start) and returns
each count and the window's remaining TTL. The keys and windows are those
flask-limiter used (``sluice:rl:LIMITER/<ip>/<scope>/<amount>/<n>/<unit>``,
fixed windows as in its ``incr_expire.lua``), so counters carry over a
deploy. flask-limiter itself is no longer in the request path: it took two
round trips for a stream start and, for every request, more CPU in its own
bookkeeping than the Redis call (a fifth of a resume's worker CPU in a
reconnect storm, its limit keys' string building alone 6 %).

Redis down: the count falls back to per-worker in-memory windows (the
`limits` library's ``MemoryStorage``) for `COOLDOWN` seconds instead of
answering 500 or waiting on a dead server for every request; routes that
need Redis answer 503 ``redis_unavailable`` on their own, and /health,
/ready, /metrics and the page are never rate limited.

Concurrency slots (``MAX_CONCURRENT_STREAMS``) are in `streaming.slots`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import Blueprint, Flask, current_app, request
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from streaming.core import sluice
from streaming.errors import ApiError

__all__ = ["KEY_PREFIX", "client_ip", "default_limit", "init_limits", "stream_limit"]

logger = logging.getLogger(__name__)

KEY_PREFIX = "sluice:rl"
DEFAULT_SCOPE, STREAM_SCOPE = "api", "stream"
COOLDOWN = 2.0  # seconds counted in memory after Redis failed

# Fixed windows, as limits' own incr_expire.lua, for every key at once. ARGV: each key's
# window in seconds. Returns each key's count and TTL.
_HIT = """
local out = {}
for i, key in ipairs(KEYS) do
  local n = redis.call('INCRBY', key, 1)
  if n == 1 then redis.call('EXPIRE', key, ARGV[i]) end
  out[#out + 1] = n
  out[#out + 1] = redis.call('TTL', key)
end
return out
"""

_limited: set[str] = set()  # blueprints counted against the default budget
_starts: set[Callable[..., Any]] = set()  # views counted against both budgets


def client_ip() -> str:
    return request.remote_addr or "unknown"


def default_limit(bp: Blueprint) -> Blueprint:
    """Count every request to `bp`'s routes against the default budget."""
    _limited.add(bp.name)
    return bp


def stream_limit(view: Callable[..., Any]) -> Callable[..., Any]:
    """Count requests to this view (a generation start) against both budgets."""
    _starts.add(view)
    return view


class _Counter:
    """One app's counting: its Lua script, and the in-memory fallback while Redis is away."""

    def __init__(self, redis_client: redis.Redis):
        self.hit = redis_client.register_script(_HIT)
        self.memory = FixedWindowRateLimiter(MemoryStorage())
        self.down_until = 0.0

    def count(
        self, ip: str, windows: tuple[tuple[RateLimitItem, str, str], ...]
    ) -> list[tuple[RateLimitItem, bool, int]]:
        """Count one request in each window: (item, over its amount, seconds left or 0)."""
        if time.monotonic() >= self.down_until:
            keys, expiries = [w[2] for w in windows], [w[0].get_expiry() for w in windows]
            try:
                out = self.hit(keys=keys, args=expiries)
            except redis.RedisError as exc:
                logger.warning("rate limits counted in memory for %.0f s: %s", COOLDOWN, exc)
                self.down_until = time.monotonic() + COOLDOWN
            else:
                return [
                    (item, out[2 * i] > item.amount, out[2 * i + 1])
                    for i, (item, _, _) in enumerate(windows)
                ]
        return [(item, not self.memory.hit(item, ip, scope), 0) for item, scope, _ in windows]


@functools.lru_cache(maxsize=8)
def _items(spec: str, scope: str) -> tuple[tuple[RateLimitItem, str], ...]:
    return tuple((item, scope) for item in parse_many(spec))


@functools.lru_cache(maxsize=4096)
def _windows(
    ip: str, default: str, stream: str | None
) -> tuple[tuple[RateLimitItem, str, str], ...]:
    """Each window of this client: (item, scope, Redis key); the keys as flask-limiter's."""
    items = _items(default, DEFAULT_SCOPE) + (_items(stream, STREAM_SCOPE) if stream else ())
    return tuple((item, scope, f"{KEY_PREFIX}:{item.key_for(ip, scope)}") for item, scope in items)


def _count() -> None:
    """The app-level hook: count this request, refuse it past any of its windows."""
    if request.blueprint not in _limited:
        return
    settings = sluice().settings
    start = current_app.view_functions.get(request.endpoint or "") in _starts
    ip = client_ip()
    windows = _windows(
        ip, settings.rate_limit_default, settings.rate_limit_stream if start else None
    )
    for item, over, ttl in current_app.extensions["sluice_limits"].count(ip, windows):
        if over:
            wait = max(1, ttl if ttl > 0 else item.get_expiry())
            headers = {
                "Retry-After": str(wait),
                "X-RateLimit-Limit": str(item.amount),
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(int(time.time()) + wait),
            }
            raise ApiError(
                429, "rate_limited", f"Rate limit exceeded ({item}); retry later.", headers
            )


def init_limits(app: Flask, redis_client: redis.Redis) -> None:
    app.extensions["sluice_limits"] = _Counter(redis_client)
    app.before_request(_count)
