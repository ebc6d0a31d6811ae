"""StreamManager: the streaming core's entry points (start, finish, cancel, shutdown).

It owns this worker's live generations (``local``; Redis is the registry) and
wires the parts, each with one job and its own module:

- `streaming.core.registry`   admission (slot, session lease, entry: one round trip),
                         the entry of each stream, dead workers
- `streaming.core.eventlog`   each stream's event log, batched by one flusher
- `streaming.core.logreader`  one reader for every follower of another worker's stream
- `streaming.core.cancelbus`  cancel across workers and hosts, and its acknowledgement
- `streaming.core.upkeep`     the tick (leases, lost entries, cancel flags) and the watchdog
- `streaming.core.usage`      usage per client and UTC day, the daily token budget
- `streaming.core.keys`       every Redis key and channel

Flows (docs/FLOWS.md has each with its keys and its test):

- start: `start` admits (budget, slot, lease, entry: one round trip), lowers
  the request's token caps to the budget left, builds the `Generation` (its
  ``start`` event exists at once) and spawns its reader greenlet.
- finish: the generation's single ``finally`` calls `finished` once, after its
  ``done`` event: one pipeline writes the rest of the event log, marks the
  entry finished, acknowledges a cancel, releases the slot, saves the
  session turn and counts the ``done`` event's usage (at most once per stream).
- cancel: `cancel` stops a local generation directly, or asks the cancel bus.
- shutdown: `shutdown` ends every local stream with an ``interrupted`` error.

Redis outage. At start it is a 503 before any stream begins (`RedisError`
from admission). Mid-stream the generation goes on for its local clients;
flushes to the event log are kept and retried, and the registry entry
expires on its own if Redis stays away.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import time
from typing import Any

import gevent
import redis

from streaming import metrics
from streaming.core import keys
from streaming.core.cancelbus import CancelBus
from streaming.core.eventlog import EventLog
from streaming.core.generation import Generation, GenerationRequest, StreamStopped
from streaming.core.logreader import LogReader
from streaming.core.registry import LIVE_TTL, Registry
from streaming.core.sessions import SessionStore
from streaming.core.slots import Slots
from streaming.core.upkeep import Upkeep
from streaming.core.usage import Usage, cap
from streaming.redis_conn import RedisGate
from streaming.sse import is_done_frame, read_frames
from streaming.upstream.routing import Router

__all__ = ["RedisGate", "StreamManager", "new_stream_id", "valid_stream_id"]

logger = logging.getLogger(__name__)

STOP_CANCEL_WAIT = 5.0
_ID_CHARS = frozenset("0123456789abcdef")


def new_stream_id() -> str:
    return "st_" + secrets.token_hex(16)


def valid_stream_id(stream_id: str) -> bool:
    return len(stream_id) == 35 and stream_id.startswith("st_") and set(stream_id[3:]) <= _ID_CHARS


def done_usage(gen: Generation) -> dict:
    """The usage that the generation's ``done`` event carries (its last frame)."""
    frame = gen.frames[-1] if gen.frames else b""
    if is_done_frame(frame):
        for event, data in read_frames(frame):
            if event == b"done":
                return json.loads(data).get("usage") or {}
    return {}


def _count_tokens(request: GenerationRequest, reason: str, usage: dict) -> None:
    for kind in ("prompt", "completion"):
        tokens = int(usage.get(f"{kind}_tokens") or 0)
        if tokens:
            metrics.USAGE_TOKENS.labels(request.surface, reason, kind).inc(tokens)


class StreamManager:
    def __init__(self, redis_client: redis.Redis, settings, upstream: Router | Any, gate=None):
        self.redis = redis_client
        self.settings = settings
        # the upstreams (streaming.upstream.routing); a bare client is one upstream (tests)
        self.router = upstream if isinstance(upstream, Router) else Router.single(upstream)
        self.upstream = self.router
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.local: dict[str, Generation] = {}  # this worker's generations
        self.gate = gate or RedisGate()
        self.slots = Slots(settings.max_concurrent_streams, LIVE_TTL)
        self.sessions = SessionStore(
            redis_client, settings.session_ttl_seconds, settings.session_max_messages
        )
        self.usage = Usage(redis_client, settings.token_budget_daily)
        self.registry = Registry(
            redis_client,
            self.worker_id,
            self.slots,
            self.sessions,
            settings.stream_retention_seconds,
            self.usage,
        )
        self.log = EventLog(redis_client, self.worker_id, LIVE_TTL)
        self.reader = LogReader(redis_client, self.log)
        self.bus = CancelBus(redis_client, self.registry, self.local)
        self.upkeep = Upkeep(
            redis_client,
            self.local,
            self.registry,
            self.bus,
            self.log,
            self.slots,
            self.sessions,
            self.gate,
            settings.upstream_timeout_seconds,
        )
        self._loops: list[gevent.Greenlet] = []

    # -- lifecycle ----------------------------------------------------------------------

    def _ensure_running(self) -> None:
        if not self._loops:
            self._loops = [
                gevent.spawn(f)
                for f in (
                    self.bus.listen,
                    self.upkeep.tick_loop,
                    self.log.flush_loop,
                    self.upkeep.watchdog,
                )
            ]

    def shutdown(self, timeout: float = 5.0) -> None:
        """Worker shutdown: end every local stream with an `interrupted` error."""
        generations = list(self.local.values())
        for gen in generations:
            gen.stop(StreamStopped("error", ("interrupted", "The server is restarting.")))
        gevent.joinall([g.greenlet for g in generations if g.greenlet], timeout=timeout)
        for loop in self._loops:
            loop.kill(block=False)
        self._loops = []
        self.reader.close()

    # -- starting and finishing -----------------------------------------------------------

    def start(self, request: GenerationRequest) -> Generation:
        """Admit the stream (`Registry.admit`: `BudgetExhausted`, `TooManyStreams`,
        `SessionBusy`; a RedisError means 503), lower its token caps to the budget
        left, then start its reader greenlet."""
        self._ensure_running()
        left = self.registry.admit(request, time.time())
        if left is not None:
            request = cap(request, left)
        gen = Generation(self, request)
        self.local[request.stream_id] = gen
        gen.greenlet = gevent.spawn(gen.run)
        return gen

    def finished(self, gen: Generation, error_code: str | None) -> None:
        """Called once from a generation's `finally`, after its `done` event."""
        self.local.pop(gen.stream_id, None)
        self.log.forget(gen.stream_id)
        retention = self.settings.stream_retention_seconds
        request = gen.request
        pipe = self.redis.pipeline(transaction=False)
        append = self.log.append(pipe, gen)
        pipe.expire(keys.events(gen.stream_id), retention)
        self.registry.mark_finished(
            pipe, gen.stream_id, gen.reason or "error", len(gen.frames), error_code
        )
        self.bus.acknowledge(pipe, gen)
        self.slots.release(pipe, request.client, gen.stream_id)
        if request.session_id:
            interrupted = gen.reason not in ("stop", "length")
            self.sessions.save_turn(
                pipe, request.session_id, request.new_messages, "".join(gen.text), interrupted
            )
        usage = done_usage(gen)
        self.usage.count(pipe, request.client, gen.stream_id, usage, time.time())
        _count_tokens(request, gen.reason or "error", usage)
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            logger.warning("stream %s: final write failed: %s", gen.stream_id, exc)
            return
        if append is not None and not self.log.settle(append, replies[append.at]):
            self.log.write_rest(gen, retention)  # a flush still in flight, or a lost log

    # -- the registry and cancel ------------------------------------------------------------

    def info(self, stream_id: str, owner: str) -> dict[str, str] | None:
        """The registry entry, or None when unknown, expired or owned by someone else."""
        return self.registry.info(stream_id, owner)

    def cancel(self, stream_id: str, owner: str) -> str | None:
        """Stop a stream wherever it runs: 'cancelled', 'finished', or None (404)."""
        info = self.info(stream_id, owner)
        if info is None:
            return None
        if info["state"] == "finished":
            return "finished"
        gen = self.local.get(stream_id)
        if gen is not None:
            gen.stop(StreamStopped("cancelled"))
            gen.ended.wait(STOP_CANCEL_WAIT)
            return "cancelled" if gen.reason == "cancelled" else "finished"
        self._ensure_running()
        return self.bus.cancel_remote(stream_id, owner)
