"""Per-client protections: flask-limiter rate limits and concurrency slots, both in Redis.

Rate limits (flask-limiter, storage: the app's own Redis pool, never memory://
across workers): ``RATE_LIMIT_DEFAULT`` is one budget per client IP shared by
every /api and /v1 route; ``RATE_LIMIT_STREAM`` is a second budget for starting
generations. Refusals are 429 ``rate_limited`` with ``Retry-After`` and
``X-RateLimit-*`` headers. Answers that pass carry no such headers: reading
the window for them costs two more Redis round trips (GET + TTL) per request,
a fifth of the CPU of starting a stream; the refusal is where a client needs
them.

Starting a generation counts against both budgets, and pays one Redis round
trip for both: `stream_limit` hits the default budget's and the stream
budget's counters (the same fixed-window keys, under the same names, that
flask-limiter uses for the default budget on every other route) in one Lua
call, and flask-limiter skips those routes (a documented request filter).
Through flask-limiter the two limits were two round trips and a fifth of a
start's CPU. Like flask-limiter, every limit is counted and any one exceeded
refuses.

Redis down: the limiter falls back to per-worker in-memory counters (and
swallows storage errors) instead of answering 500; so does `stream_limit`.
Routes that need Redis answer 503 ``redis_unavailable`` on their own, and
/health, /ready, /metrics and the page are never rate limited.

Concurrency slots (``MAX_CONCURRENT_STREAMS``) are in `streaming.slots`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, Response, current_app, request
from flask_limiter import Limiter, RateLimitExceeded
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from streaming import metrics
from streaming.core import sluice
from streaming.errors import ApiError, error_response

__all__ = ["default_limit", "init_limits", "limiter", "stream_limit"]

logger = logging.getLogger(__name__)


def client_ip() -> str:
    return request.remote_addr or "unknown"


limiter = Limiter(
    key_func=client_ip,
    headers_enabled=False,  # on refusals only: see `_refused`
    swallow_errors=True,
    in_memory_fallback_enabled=True,
)

KEY_PREFIX = "sluice:rl"
DEFAULT_SCOPE, STREAM_SCOPE = "api", "stream"

default_limit = limiter.shared_limit(
    lambda: sluice().settings.rate_limit_default, scope=DEFAULT_SCOPE
)

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

_views: set[Callable[..., Any]] = set()  # the views `stream_limit` counts for
_memory = FixedWindowRateLimiter(MemoryStorage())  # fallback while Redis is away


def stream_limit(view: Callable[..., Any]) -> Callable[..., Any]:
    """Count a generation start against both budgets, in one Redis round trip."""

    @functools.wraps(view)
    def limited(*args: Any, **kwargs: Any) -> Any:
        _check_start()
        return view(*args, **kwargs)

    _views.add(limited)
    return limited


@limiter.request_filter
def _counted_by_stream_limit() -> bool:
    return current_app.view_functions.get(request.endpoint or "") in _views


@functools.lru_cache(maxsize=8)
def _items(default: str, stream: str) -> tuple[tuple[RateLimitItem, str], ...]:
    return tuple(
        [(item, DEFAULT_SCOPE) for item in parse_many(default)]
        + [(item, STREAM_SCOPE) for item in parse_many(stream)]
    )


def _check_start() -> None:
    settings = sluice().settings
    items = _items(settings.rate_limit_default, settings.rate_limit_stream)
    ip = client_ip()
    keys = [f"{KEY_PREFIX}:{item.key_for(ip, scope)}" for item, scope in items]
    try:
        out = current_app.extensions["sluice_limits"](
            keys=keys, args=[item.get_expiry() for item, _ in items]
        )
    except redis.RedisError as exc:
        logger.warning("rate limit storage unreachable, counting in memory: %s", exc)
        counted = [(item, _memory.hit(item, ip, scope)) for item, scope in items]
        for item, ok in counted:
            if not ok:
                raise _refusal(item, item.get_expiry()) from None
        return
    for i, (item, _) in enumerate(items):
        count, ttl = out[2 * i], out[2 * i + 1]
        if count > item.amount:
            raise _refusal(item, ttl if ttl > 0 else item.get_expiry())


def _refusal(item: RateLimitItem, ttl: int) -> ApiError:
    headers = {
        "Retry-After": str(max(1, ttl)),
        "X-RateLimit-Limit": str(item.amount),
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": str(int(time.time()) + max(1, ttl)),
    }
    return ApiError(429, "rate_limited", f"Rate limit exceeded ({item}); retry later.", headers)


def init_limits(app: Flask, redis_client: redis.Redis) -> None:
    app.config["RATELIMIT_STORAGE_URI"] = "redis://"
    app.config["RATELIMIT_STORAGE_OPTIONS"] = {
        "connection_pool": redis_client.connection_pool,
        "key_prefix": KEY_PREFIX,
    }
    limiter.init_app(app)
    app.register_error_handler(RateLimitExceeded, _refused)
    app.extensions["sluice_limits"] = redis_client.register_script(_HIT)


def _refused(exc: RateLimitExceeded) -> Response:
    metrics.LIMIT_REJECTIONS.labels("rate_limited").inc()
    headers = {}
    breached = limiter.current_limit
    if breached is not None:
        try:
            reset_at, remaining = breached.reset_at, breached.remaining
        except Exception as err:  # the window could not be read (Redis away): no hint
            logger.debug("rate limit window unavailable: %s", err)
        else:
            headers = {
                "Retry-After": str(max(1, int(reset_at - time.time()))),
                "X-RateLimit-Limit": str(breached.limit.amount),
                "X-RateLimit-Remaining": str(remaining),
                "X-RateLimit-Reset": str(reset_at),
            }
    message = f"Rate limit exceeded ({exc.description}); retry later."
    return error_response(429, "rate_limited", message, headers)
