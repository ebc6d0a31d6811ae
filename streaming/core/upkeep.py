"""Upkeep: what keeps a worker's streams alive and honest in Redis, and the watchdog.

The tick (every `TICK` seconds, one pipeline for all the worker's streams):
the worker's liveness mark; each stream's registry entry, event log, slot and
session lease renewed; its cancel flag read (pub/sub may have dropped the
message); entries that a restarted Redis lost are written again (their EXPIRE
answered 0); the leases of streams that ended meanwhile are released. A tick
that fails opens the `RedisGate` (requests needing Redis answer 503 at once
for a moment); one that succeeds closes it.

The watchdog (one timer per worker, not one per stream) stops a generation
whose upstream sent nothing for ``UPSTREAM_TIMEOUT_SECONDS``.
"""

from __future__ import annotations

import logging
import time

import gevent
import redis

from streaming.core.cancelbus import CancelBus
from streaming.core.eventlog import EventLog
from streaming.core.generation import Generation
from streaming.core.registry import LIVE_TTL, TICK, Registry
from streaming.core.sessions import SessionStore
from streaming.core.slots import Slots
from streaming.redis_conn import RedisGate

__all__ = ["Upkeep"]

logger = logging.getLogger(__name__)


class Upkeep:
    def __init__(
        self,
        redis_client: redis.Redis,
        local: dict[str, Generation],
        registry: Registry,
        bus: CancelBus,
        log: EventLog,
        slots: Slots,
        sessions: SessionStore,
        gate: RedisGate,
        upstream_timeout: float,
    ):
        self.redis = redis_client
        self.local = local
        self.registry = registry
        self.bus = bus
        self.log = log
        self.slots = slots
        self.sessions = sessions
        self.gate = gate
        self.upstream_timeout = upstream_timeout

    def tick_loop(self) -> None:
        while True:
            try:
                self.tick()
                self.gate.recovered()
            except redis.RedisError as exc:
                self.gate.failed()
                logger.warning("registry refresh failed: %s", exc)
            gevent.sleep(TICK)

    def tick(self) -> None:
        gens = list(self.local.values())
        pipe = self.redis.pipeline(transaction=False)
        self.registry.alive(pipe)
        at = []  # per generation: (its cancel flag reply, its registry EXPIRE reply)
        for gen in gens:
            request = gen.request
            flag_at = len(pipe)
            self.bus.flagged(pipe, gen.stream_id)
            entry_at = len(pipe)
            self.registry.renew(pipe, gen.stream_id)
            at.append((flag_at, entry_at))
            self.log.renew(pipe, gen.stream_id)
            self.slots.renew(pipe, request.client, gen.stream_id)
            if request.session_id:
                self.sessions.renew(pipe, request.session_id, gen.stream_id, LIVE_TTL)
        replies = pipe.execute()
        fix = self.redis.pipeline(transaction=False)
        cancelled = []
        for gen, (flag_at, entry_at) in zip(gens, at, strict=True):
            if replies[flag_at]:
                cancelled.append(gen.stream_id)
            if not replies[entry_at] and not gen.done:
                self.registry.register_if_missing(fix, gen.request, gen.created)
        for gen in gens:
            if gen.done:  # ended while we renewed: do not leave its leases behind
                self.slots.release(fix, gen.request.client, gen.stream_id)
                if gen.request.session_id:
                    self.sessions.release_if_held(fix, gen.request.session_id, gen.stream_id)
        if len(fix):
            fix.execute()
        self.bus.stop_local(cancelled)

    def watchdog(self) -> None:
        """Stop generations whose upstream sent nothing for UPSTREAM_TIMEOUT_SECONDS."""
        timeout = self.upstream_timeout
        period = min(1.0, timeout / 10)
        while True:
            gevent.sleep(period)
            deadline = time.monotonic() - timeout
            for gen in list(self.local.values()):
                if gen.last_read < deadline:
                    gen.upstream_silent()
            gen = None  # the loop variable would keep the last one alive while we sleep
