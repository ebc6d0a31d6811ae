"""Prometheus metrics, summed over every gunicorn worker (multiprocess mode).

The gunicorn master sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh directory)
before forking; each worker writes its own files there and ``/metrics``
aggregates them. Without that variable (a single process) the default
registry is used. No Flask here (the core counts into these); the route is
`streaming.web.ops`.
"""

from __future__ import annotations

import os

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
]

LIVE_STREAMS = Gauge("sluice_live_streams", "Generations running now.", multiprocess_mode="livesum")
TTFT = Histogram(
    "sluice_time_to_first_token_seconds",
    "From start to the first token event.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
TOKENS = Counter("sluice_tokens_relayed", "Upstream content deltas relayed to clients.")
GENERATIONS = Counter("sluice_generations", "Finished generations by final reason.", ["reason"])
CANCEL_LATENCY = Histogram(
    "sluice_cancel_latency_seconds",
    "DELETE received to the generation stopped (upstream closed).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
CLIENT_DISCONNECTS = Counter("sluice_client_disconnects", "Clients gone before the done event.")
UPSTREAM_ERRORS = Counter("sluice_upstream_errors", "Upstream failures by error code.", ["code"])
# Usage of finished generations (what the per-owner counters of streaming.core.usage add
# up, estimates included), by surface ("api", "v1"), final reason and kind ("prompt",
# "completion"). No owner label: per-owner figures are GET /api/v1/usage's.
USAGE_TOKENS = Counter(
    "sluice_usage_tokens",
    "Tokens of finished generations (usage or its estimate) by surface, reason and kind.",
    ["surface", "reason", "kind"],
)
LIMIT_REJECTIONS = Counter("sluice_rate_limit_rejections", "Requests refused by a limit.", ["code"])


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every worker (the body of ``GET /metrics``) and its type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # prometheus_client's own variable
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
