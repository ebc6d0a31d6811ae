"""Per-client protections: flask-limiter rate limits and concurrency slots, both in Redis.

Rate limits (flask-limiter, storage: the app's own Redis pool, never memory://
across workers): ``RATE_LIMIT_DEFAULT`` is one budget per client shared by
every /api and /v1 route; ``RATE_LIMIT_STREAM`` is a second budget for starting
generations. The client (`limit_key`) is the IP in open mode and the owner in
authenticated mode (API.md section 2: an office behind one NAT is not one
bucket); a request without a valid credential counts against its IP.
Refusals are 429 ``rate_limited`` with ``Retry-After`` and ``X-RateLimit-*``
headers. Answers that pass carry no such headers: reading the window for them
costs two more Redis round trips (GET + TTL) per request, a fifth of the CPU
of starting a stream; the refusal is where a client needs them.

Failed authentications (`auth_failure_limit`, ``RATE_LIMIT_AUTH_FAILURES``, per
client IP, authenticated mode only) use flask-limiter's own conditional
deduction (``deduct_when``): before a request the window is only tested (a
spent one is 429 ``rate_limited`` for every request from that IP, valid
credentials included: a guesser must not learn which guess was right), and
after it a 401 is counted when the request presented a credential (a bearer,
or the sign-in cookie on /api) that was not valid. A request that presented
none (a page asking whether it is signed in), or a valid bearer asking for a
cookie sign-in it does not have, is no guess. CORS preflights (``OPTIONS``)
count against no limit.

Redis down: the limiter falls back to per-worker in-memory counters (and
swallows storage errors) instead of answering 500; routes that need Redis
answer 503 ``redis_unavailable`` on their own, and /health, /ready, /metrics
and the page are never rate limited.

Concurrency slots (``MAX_CONCURRENT_STREAMS``) are in `streaming.core.slots`.
"""

from __future__ import annotations

import logging
import time

import redis
from flask import Flask, Response, request
from flask_limiter import Limiter, RateLimitExceeded

from streaming import metrics
from streaming.redis_conn import limiter_storage
from streaming.web.context import caller, presented_credential, sluice
from streaming.web.errors import error_response

__all__ = [
    "auth_failure_limit",
    "client_ip",
    "default_limit",
    "init_limits",
    "limit_key",
    "limiter",
    "stream_limit",
]

logger = logging.getLogger(__name__)


def client_ip() -> str:
    return request.remote_addr or "unknown"


def limit_key() -> str:
    """Who a rate limit counts against: the owner in authenticated mode, else the client IP."""
    if sluice().settings.authenticated:
        who = caller()  # never raises (an exception here would count as a storage failure)
        if who is not None:
            return who.owner
    return client_ip()


def _preflight() -> bool:
    return request.method == "OPTIONS"


def _auth_exempt() -> bool:
    return request.method == "OPTIONS" or not sluice().settings.authenticated


def _failed_authentication(response: Response) -> bool:
    """A 401 to a request whose credential (a bearer, or the cookie on /api) was not valid."""
    return response.status_code == 401 and presented_credential(request) and caller() is None


limiter = Limiter(
    key_func=limit_key,
    headers_enabled=False,  # on refusals only: see `_refused`
    swallow_errors=True,
    in_memory_fallback_enabled=True,
)

default_limit = limiter.shared_limit(
    lambda: sluice().settings.rate_limit_default, scope="api", exempt_when=_preflight
)
stream_limit = limiter.shared_limit(
    lambda: sluice().settings.rate_limit_stream, scope="stream", override_defaults=False
)
auth_failure_limit = limiter.shared_limit(
    lambda: sluice().settings.rate_limit_auth_failures,
    scope="auth",
    key_func=client_ip,
    exempt_when=_auth_exempt,
    deduct_when=_failed_authentication,
    override_defaults=False,
)


def init_limits(app: Flask, redis_client: redis.Redis) -> None:
    cluster = limiter_storage(redis_client, app.extensions["sluice"].settings.redis_url or "")
    if cluster is not None:  # Redis Cluster: limits' own redis+cluster:// storage
        app.config["RATELIMIT_STORAGE_URI"] = cluster[0]
        app.config["RATELIMIT_STORAGE_OPTIONS"] = {**cluster[1], "key_prefix": "sluice:rl"}
    else:
        app.config["RATELIMIT_STORAGE_URI"] = "redis://"
        app.config["RATELIMIT_STORAGE_OPTIONS"] = {
            "connection_pool": redis_client.connection_pool,
            "key_prefix": "sluice:rl",
        }
    limiter.init_app(app)
    app.register_error_handler(RateLimitExceeded, _refused)


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
