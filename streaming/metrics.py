"""Prometheus metrics, summed over every gunicorn worker (multiprocess mode).

The gunicorn master sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory)
before forking; each worker writes its own files there and ``/metrics``
aggregates them. Without that variable (a single process) the default
registry is used. No Flask here (the core counts into these); the route is
`streaming.web.ops`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "BREAKER_STATE",
    "CANCEL_LATENCY",
    "CLIENT_DISCONNECTS",
    "GENERATIONS",
    "LIMIT_REJECTIONS",
    "LIVE_STREAMS",
    "TOKENS",
    "TTFT",
    "UPSTREAM_ERRORS",
    "USAGE_TOKENS",
    "exposition",
    "on_scrape",
]

logger = logging.getLogger(__name__)

LIVE_STREAMS = Gauge("sluice_live_streams", "Generations running now.", multiprocess_mode="livesum")
# `upstream`: the name of the upstream (API.md section 11; "default" without UPSTREAMS_FILE)
# that served the generation, or for a failure the one tried last ("none": none was tried).
TTFT = Histogram(
    "sluice_time_to_first_token_seconds",
    "From start to the first token event, by the upstream that served it.",
    ["upstream"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
TOKENS = Counter(
    "sluice_tokens_relayed", "Upstream content deltas relayed to clients.", ["upstream"]
)
GENERATIONS = Counter(
    "sluice_generations",
    "Finished generations by final reason and upstream.",
    ["reason", "upstream"],
)
CANCEL_LATENCY = Histogram(
    "sluice_cancel_latency_seconds",
    "DELETE received to the generation stopped (upstream closed).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CLIENT_DISCONNECTS = Counter("sluice_client_disconnects", "Clients gone before the done event.")
# Every failed upstream attempt (a failover counts the upstream it left), by code and upstream.
UPSTREAM_ERRORS = Counter(
    "sluice_upstream_errors", "Upstream failures by error code and upstream.", ["code", "upstream"]
)
# Each upstream's circuit breaker (streaming.upstream.breaker): 0 closed, 1 open, 2 half-open
# (cooled down: one probe may go). The state is Redis's; the worker that last saw it wins
# (mostrecent), and a scrape reads it afresh (`on_scrape`).
BREAKER_STATE = Gauge(
    "sluice_upstream_breaker_state",
    "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open.",
    ["upstream"],
    multiprocess_mode="mostrecent",
)
# Usage of finished generations (what the per-owner counters of streaming.core.usage add
# up, estimates included), by surface ("api", "v1"), final reason and kind ("prompt",
# "completion"). No owner label: per-owner figures are GET /api/v1/usage's.
USAGE_TOKENS = Counter(
    "sluice_usage_tokens",
    "Tokens of finished generations (usage or its estimate) by surface, reason and kind.",
    ["surface", "reason", "kind"],
)
LIMIT_REJECTIONS = Counter("sluice_rate_limit_rejections", "Requests refused by a limit.", ["code"])


_refresh: list[Callable[[], None]] = []  # called before a scrape (one: the app's)


def on_scrape(refresh: Callable[[], None]) -> None:
    """Call `refresh` before each exposition (it sets gauges read from elsewhere, e.g. Redis)."""
    _refresh[:] = [refresh]


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every worker (the body of ``GET /metrics``) and its type."""
    for refresh in _refresh:
        try:
            refresh()
        except Exception:  # a gauge's source being away never fails the scrape
            logger.warning("metrics refresh failed", exc_info=True)
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # prometheus_client's own variable
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
