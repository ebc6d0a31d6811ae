"""Routing and failover across upstreams (API.md section 11).

`Router` holds one `Target` per upstream (each its own SDK client and
connection pool, so each applies the proxy the environment gives its URL:
`streaming.upstream.transport.proxy_for`) and the shared `Breaker`. Without
``UPSTREAMS_FILE`` it holds the single upstream of ``OPENAI_BASE_URL``, named
``default``, with no breaker: the codes of section 4 stay as they are.

A generation walks a `Route` (`Router.route(model)`): the upstreams that list
the model, in file order.

- `Route.next` gives the next upstream whose breaker lets the request through
  (an open one is skipped, and not listed in ``failed_over``), or None.
- `Route.failed` records a failed attempt (metrics, breaker) and says whether
  the generation may move on: only for a failure of the upstream (connection,
  5xx, 429, no head in time, a stream broken) and only while nothing was
  relayed to the client (the generation knows; it tells).
- `Route.served` (the first delta relayed) and `Route.end` (the generation's
  ``finally``) give the breaker its verdict, once per attempt.
- `Route.unavailable` is the error when none is left: ``upstream_unavailable``
  naming the last failure (or, without the file, the one upstream's own error).

Nothing here keeps an exception (plain data only: a generation must be freed by
reference counting; see streaming.core.generation, Memory).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import redis

from streaming import metrics
from streaming.redis_conn import RedisGate
from streaming.upstream.breaker import Breaker, Ticket
from streaming.upstream.client import Upstream, UpstreamError
from streaming.upstream.upstreams import UpstreamSpec, default_upstream

__all__ = ["Route", "Router", "Target"]

logger = logging.getLogger(__name__)

_NO_BREAKER = Ticket()


class Target:
    """One upstream: its name, its client, which models it serves and under which names."""

    __slots__ = ("client", "head_timeout", "name", "spec")

    def __init__(self, spec: UpstreamSpec, client: Any, head_timeout: float | None):
        self.name = spec.name
        self.spec = spec
        self.client = client
        self.head_timeout = head_timeout

    def open(self, model: str, **params: Any) -> Any:
        """Send the request (the model under this upstream's name for it)."""
        if self.head_timeout is not None:
            params["head_timeout"] = self.head_timeout
        return self.client.open(model=self.spec.upstream_model(model), **params)

    def close(self) -> None:
        close = getattr(self.client, "close", None)
        if close is not None:
            close()


class Router:
    """The upstreams of this worker and their breaker; `route(model)` per generation."""

    def __init__(self, targets: Iterable[Target], breaker: Breaker | None, pooled: bool):
        self.targets = list(targets)
        self.breaker = breaker
        self.pooled = pooled  # UPSTREAMS_FILE: upstream_unavailable when none is left

    @classmethod
    def from_settings(cls, settings: Any, redis_client: redis.Redis, gate: RedisGate) -> Router:
        timeout = settings.upstream_timeout_seconds
        head = settings.upstream_head_timeout
        if not settings.upstreams:
            spec = default_upstream(settings.openai_base_url, settings.openai_api_key)
            client = Upstream(spec.base_url, spec.api_key, timeout)
            return cls([Target(spec, client, head)], None, pooled=False)
        unserved = [m for m in settings.allowed_models if m not in settings.models]
        if unserved:  # said once per worker, not dropped silently
            logger.warning(
                "ALLOWED_MODELS names models no upstream of UPSTREAMS_FILE lists; "
                "requests for them get model_not_allowed",
                extra={"models": unserved},
            )
        targets = [
            Target(spec, Upstream(spec.base_url, spec.api_key, timeout), head)
            for spec in settings.upstreams
        ]
        breaker = Breaker(
            redis_client,
            gate,
            settings.upstream_failure_threshold,
            settings.upstream_cooldown_seconds,
            lease=head + timeout + 5,  # longer than a probe takes to show its verdict
        )
        router = cls(targets, breaker, pooled=True)
        metrics.on_scrape(router.refresh_gauges)
        return router

    @classmethod
    def single(cls, client: Any) -> Router:
        """One upstream client as a router (no breaker, no head timeout): tests' stand-ins."""
        return cls([Target(default_upstream(None, None), client, None)], None, pooled=False)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    def route(self, model: str) -> Route:
        return Route(self, model)

    def refresh_gauges(self) -> None:
        """Set the breaker gauge of every upstream from Redis (before a scrape)."""
        if self.breaker is None:
            return
        for name, state in self.breaker.states(self.names).items():
            metrics.BREAKER_STATE.labels(name).set(state)

    def close(self) -> None:
        for target in self.targets:
            target.close()


class Route:
    """One generation's way through the upstreams of its model."""

    __slots__ = (
        "_last",
        "_left",
        "_reported",
        "_router",
        "_ticket",
        "current",
        "failed_over",
        "model",
    )

    def __init__(self, router: Router, model: str):
        self._router = router
        self.model = model
        self._left = [t for t in router.targets if t.spec.serves(model)]
        self.failed_over: list[str] = []  # tried and failed before the one serving
        self.current: Target | None = None  # the upstream of the attempt under way (or last)
        self._ticket: Ticket = _NO_BREAKER
        self._reported = True  # the current attempt's verdict went to the breaker
        self._last: tuple[str, str, str] | None = None  # (upstream, code, message)

    @property
    def upstream(self) -> str:
        """The label of the upstream serving (or tried last): "none" before any."""
        return self.current.name if self.current is not None else "none"

    def next(self) -> Target | None:
        """The next upstream to try (its breaker lets us through), or None: none left."""
        breaker = self._router.breaker
        while self._left:
            target = self._left.pop(0)
            ticket = breaker.acquire(target.name) if breaker is not None else _NO_BREAKER
            if ticket is None:
                continue  # open breaker: skipped, not listed in failed_over
            self.current, self._ticket, self._reported = target, ticket, False
            return target
        return None

    def failed(self, exc: UpstreamError, relayed: bool) -> bool:
        """The current attempt failed; True when the generation may try the next upstream."""
        target = self.current
        assert target is not None
        metrics.UPSTREAM_ERRORS.labels(exc.code, target.name).inc()
        self._verdict(failure=exc.retryable)
        self._last = (target.name, exc.code, exc.message)
        if exc.retryable and not relayed:
            self.failed_over.append(target.name)
            logger.info(
                "upstream_failover",
                extra={"upstream": target.name, "error": exc.code, "model": self.model},
            )
            return True
        return False

    def served(self) -> None:
        """The first delta of the current attempt was relayed: the upstream works."""
        if not self._reported:
            self._verdict(failure=False)

    def end(self, reason: str, error_code: str | None) -> None:
        """The generation ended (`reason` of its ``done``): an attempt still without a
        verdict gets one, or its probe lease back (cancelled, shut down: nothing learnt)."""
        breaker = self._owed_verdict()
        if breaker is None:
            return
        if error_code == "upstream_timeout":  # silent after its head (the watchdog)
            breaker.failure(self.current.name, self._ticket)
        elif error_code is None and reason not in ("cancelled", "error"):
            breaker.success(self.current.name, self._ticket)  # ended well, empty
        else:
            breaker.release(self.current.name, self._ticket)

    def unavailable(self) -> UpstreamError:
        """The error when no upstream is left."""
        if not self._router.pooled and self._last is not None:
            return UpstreamError(self._last[1], self._last[2], retryable=False)
        if self._last is not None:
            name, _code, message = self._last
            text = f"No upstream could serve {self.model}; the last tried, {name}: {message}"
        else:
            text = f"Every upstream of {self.model} is cooling down after failures."
        return UpstreamError("upstream_unavailable", text, retryable=False)

    def _owed_verdict(self) -> Breaker | None:
        """The breaker, when the current attempt still owes it a verdict (then no more)."""
        if self._reported or self.current is None:
            return None
        self._reported = True
        return self._router.breaker

    def _verdict(self, failure: bool) -> None:
        breaker = self._owed_verdict()
        if breaker is None:
            return
        if failure:
            breaker.failure(self.current.name, self._ticket)
        else:
            breaker.success(self.current.name, self._ticket)
