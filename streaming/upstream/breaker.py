"""The circuit breaker of each upstream, shared in Redis by every worker and host.

State per upstream: one hash, ``keys.breaker(name)`` (its own hash tag, so one
slot on a cluster), with ``fails`` (consecutive failures), ``until`` (open until
this epoch ms) and ``probe`` (the lease of the one request probing it). Each
step is one script, so concurrent workers cannot race:

- `acquire` (before a request goes to the upstream): closed (no ``until``) ->
  go; open (now < ``until``) -> skip; cooled down -> the first caller takes the
  probe lease (``probe``, SET-if-free with an expiry) and goes, every other
  caller skips while the lease holds.
- `failure`: ``fails`` + 1; at ``UPSTREAM_FAILURE_THRESHOLD``, or for a failed
  probe, open for a full ``UPSTREAM_COOLDOWN_SECONDS`` (and free the lease).
- `success`: the hash is deleted (closed, zero failures). Sent only when it
  changes something (a probe, or failures counted before), so a healthy
  upstream costs one round trip per request (`acquire`), no more.
- `release`: a probe that ended without a verdict (cancelled, a 4xx the
  client caused) frees its lease, so the next request probes.

Clocks: the workers' epoch time (hosts are NTP-synced; a skew of milliseconds
only moves a cooldown by as much). The probe lease outlives the longest a probe
can take to show its verdict (head timeout + upstream timeout), so a worker that
dies while probing delays the next probe by that much at most.

Redis down: the breaker fails open, i.e. treats every upstream as closed
(`acquire` says go, reports are dropped), so generation never depends on
Redis being up here; failover still works, per request. While the manager's
`RedisGate` is open (Redis known away) no call is even tried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis

from streaming import metrics
from streaming.core import keys
from streaming.redis_conn import RedisGate

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "Ticket"]

logger = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = 0, 1, 2  # the gauge's values (sluice_upstream_breaker_state)

# KEYS[1] breaker hash; ARGV now_ms, lease_ms, ttl_ms -> {go (0/1), probe lease or "", fails}
_ACQUIRE = """
local state = redis.call('HMGET', KEYS[1], 'fails', 'until', 'probe')
local now = tonumber(ARGV[1])
local opened = tonumber(state[2] or '0')
if opened == 0 then
  return {1, '', tonumber(state[1] or '0')}
end
if now < opened then
  return {0, '', 0}
end
if tonumber(state[3] or '0') > now then
  return {0, '', 0}
end
local lease = tostring(now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'probe', lease)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, lease, 0}
"""

# KEYS[1]; ARGV now_ms, threshold, cooldown_ms, probe (0/1), ttl_ms -> {fails, opened (0/1)}
_FAILURE = """
local fails = redis.call('HINCRBY', KEYS[1], 'fails', 1)
local opened = 0
if ARGV[4] == '1' or fails >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'until', tonumber(ARGV[1]) + tonumber(ARGV[3]))
  redis.call('HDEL', KEYS[1], 'probe')
  opened = 1
end
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {fails, opened}
"""

# KEYS[1]; ARGV lease -> 1 if the lease was ours and is freed
_RELEASE = """
if redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  return redis.call('HDEL', KEYS[1], 'probe')
end
return 0
"""


@dataclass(frozen=True)
class Ticket:
    """Leave to call an upstream: as its probe (`lease` set) or not; `fails` seen."""

    lease: str = ""
    fails: int = 0
    known: bool = True  # False: Redis did not answer (failing open)

    @property
    def probe(self) -> bool:
        return bool(self.lease)


_GO_BLIND = Ticket(known=False)


class Breaker:
    def __init__(
        self,
        redis_client: redis.Redis,
        gate: RedisGate,
        threshold: int,
        cooldown: float,
        lease: float,
    ):
        self.redis = redis_client
        self.gate = gate
        self.threshold = threshold
        self.cooldown_ms = int(cooldown * 1000)
        self.lease_ms = int(lease * 1000)
        # the hash outlives a cooldown by far (a dead upstream's state is not forgotten
        # between probes), and still goes away on its own once nobody writes it
        self.ttl_ms = self.cooldown_ms + self.lease_ms + 3_600_000
        self._acquire = redis_client.register_script(_ACQUIRE)
        self._failure = redis_client.register_script(_FAILURE)
        self._release = redis_client.register_script(_RELEASE)

    def _usable(self) -> bool:
        return not self.gate.is_open()

    def acquire(self, name: str) -> Ticket | None:
        """A ticket to call `name`, or None: skip it (open, or another request probes)."""
        if not self._usable():
            return _GO_BLIND
        try:
            go, lease, fails = self._acquire(
                keys=[keys.breaker(name)], args=[_now_ms(), self.lease_ms, self.ttl_ms]
            )
        except redis.RedisError as exc:
            self._down(exc)
            return _GO_BLIND
        if not go:
            metrics.BREAKER_STATE.labels(name).set(OPEN)
            return None
        lease = lease.decode() if isinstance(lease, bytes) else lease
        if lease:
            metrics.BREAKER_STATE.labels(name).set(HALF_OPEN)
        return Ticket(lease=lease, fails=int(fails))

    def failure(self, name: str, ticket: Ticket) -> None:
        if not self._usable():
            return
        try:
            fails, opened = self._failure(
                keys=[keys.breaker(name)],
                args=[
                    _now_ms(),
                    self.threshold,
                    self.cooldown_ms,
                    1 if ticket.probe else 0,
                    self.ttl_ms,
                ],
            )
        except redis.RedisError as exc:
            self._down(exc)
            return
        if opened:
            metrics.BREAKER_STATE.labels(name).set(OPEN)
            logger.warning(
                "upstream_breaker_open",
                extra={"upstream": name, "failures": int(fails), "probe": ticket.probe},
            )

    def success(self, name: str, ticket: Ticket) -> None:
        if not (ticket.probe or ticket.fails or not ticket.known) or not self._usable():
            return  # nothing to reset: the common case costs no round trip
        try:
            self.redis.delete(keys.breaker(name))
        except redis.RedisError as exc:
            self._down(exc)
            return
        metrics.BREAKER_STATE.labels(name).set(CLOSED)
        if ticket.probe:
            logger.info("upstream_breaker_closed", extra={"upstream": name})

    def release(self, name: str, ticket: Ticket) -> None:
        """A probe that ended without a verdict: the next request may probe."""
        if not ticket.probe or not self._usable():
            return
        try:
            self._release(keys=[keys.breaker(name)], args=[ticket.lease])
        except redis.RedisError as exc:
            self._down(exc)

    def states(self, names: Iterable[str]) -> dict[str, int]:
        """Each upstream's state now (CLOSED, OPEN, HALF_OPEN); {} when Redis is away."""
        names = list(names)
        if not self._usable():
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hmget(keys.breaker(name), "until", "probe")
        try:
            replies = pipe.execute()
        except redis.RedisError as exc:
            self._down(exc)
            return {}
        now = _now_ms()
        states = {}
        for name, (until, _probe) in zip(names, replies, strict=True):
            opened = int(until or 0)
            states[name] = CLOSED if not opened else OPEN if now < opened else HALF_OPEN
        return states

    def _down(self, exc: Exception) -> None:
        # fail open: the upstream counts as closed; the request goes on
        self.gate.failed()
        logger.warning("upstream breaker: redis unavailable (%s), failing open", exc)


def _now_ms() -> int:
    return int(time.time() * 1000)
