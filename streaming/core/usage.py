"""Usage accounting and daily token budgets, per owner and UTC day, in Redis.

Who counts: the client that limits and slots count against (`GenerationRequest.client`):
the owner (the key's digest) in authenticated mode, the client IP in open mode.
``usage:C:D`` (`streaming.core.keys`) is a hash ``prompt_tokens completion_tokens
generations estimated`` for client C on UTC day D, kept `USAGE_TTL` seconds
(a few days: yesterday stays readable, nothing piles up).

Flows (docs/FLOWS.md, "Usage and budgets"):

- count: `Usage.count`, queued in the generation's final pipeline
  (`StreamManager.finished`, run once from the generation's single ``finally``),
  adds the usage its ``done`` event carries (the upstream's, or the estimate
  flagged ``estimated: true``) to the day the generation ended. It is one
  script that first sets the stream's mark ``counted:{c:C}:S`` with SET NX
  (in the client's slot, beside the counters: one slot on a Redis Cluster;
  kept `COUNTED_TTL`) and adds only if the mark was new: a stream is counted at most
  once whatever reaches the final pipeline twice (a pipeline that redis-py
  sends again after a lost reply, a cancel racing the normal end). It is sent
  with EVAL, not EVALSHA, so a Redis that restarted (or a promoted replica)
  without its scripts still counts.
- check: `BUDGET_LUA` is the budget's fragment of the admission script
  (`streaming.core.registry`): the start's one round trip also reads what is
  left today; nothing left refuses the start (`BudgetExhausted`, with the
  reset time). `cap` then lowers the request's token caps to what is left
  (API.md §10: the cap is what remains, so a stream overshoots by at most its
  prompt and the rounding).
- read: `Usage.read` is ``GET /api/v1/usage``.

A worker that died (SIGKILL, OOM, a lost host) never runs its final pipeline:
its streams have no ``done`` event and are not counted (`Registry.bury`
records them as ``worker_lost``, and counts nothing either, so the counters
stay the sum of the ``done`` events).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import redis

from streaming.core import keys
from streaming.core.generation import GenerationRequest
from streaming.redis_conn import script

__all__ = [
    "BUDGET_LUA",
    "CAP_FIELDS",
    "USAGE_TTL",
    "Usage",
    "cap",
    "day_of",
    "resets_at",
]

USAGE_TTL = 4 * 86400
# How long a stream's `counted` mark is kept: far longer than anything that can send
# its final pipeline again (a resent pipeline, a cancel racing the end: seconds).
COUNTED_TTL = 3600
DAY = 86400
# The token caps a request may carry; `cap` lowers each one present.
CAP_FIELDS = ("max_tokens", "max_completion_tokens")

# The budget in Lua, for the admission script (`streaming.core.registry`): what is left
# of `limit` in the day's hash (may be negative: a stream overshot by its rounding).
BUDGET_LUA = """
local function budget_left(key, limit)
  local used = redis.call('HMGET', key, 'prompt_tokens', 'completion_tokens')
  return tonumber(limit) - (tonumber(used[1]) or 0) - (tonumber(used[2]) or 0)
end
"""

# KEYS: the day's usage hash, the stream's `counted` mark (both in the client's slot).
# ARGV: prompt tokens, completion tokens, estimated (0/1), the hash's TTL, the mark's TTL.
# Returns 1 (counted) or 0 (this stream was counted already).
_COUNT = """
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[5]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'prompt_tokens', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'completion_tokens', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'generations', 1)
if ARGV[3] == '1' then redis.call('HINCRBY', KEYS[1], 'estimated', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


def day_of(now: float) -> str:
    """The UTC day of `now`, ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def resets_at(now: float) -> int:
    """The epoch second at which the UTC day of `now` ends (its budget resets)."""
    return (int(now) // DAY + 1) * DAY


def cap(request: GenerationRequest, remaining: int) -> GenerationRequest:
    """`request` with every token cap it carries at most what is left today.

    With no cap, ``max_tokens`` is set. At least 1: a start that was admitted
    may generate a token (only "nothing left" refuses a start).
    """
    limit = max(1, remaining)
    names = {f.name for f in dataclasses.fields(request)}
    present = {
        name: min(value, limit)
        for name in CAP_FIELDS
        if name in names and (value := getattr(request, name)) is not None
    }
    if not present:
        present = {"max_tokens": limit}
    return dataclasses.replace(request, **present)


class Usage:
    """Per-client daily counters and the optional daily budget (``TOKEN_BUDGET_DAILY``)."""

    def __init__(self, redis_client: redis.Redis, budget: int | None, ttl: int = USAGE_TTL):
        self.redis = redis_client
        self.budget = budget
        self.ttl = ttl

    @staticmethod
    def key(client: str, now: float) -> str:
        return keys.usage(client, day_of(now))

    def count(
        self,
        pipe: redis.client.Pipeline,
        client: str,
        stream_id: str,
        usage: dict[str, Any],
        now: float,
    ) -> None:
        """Queue the generation's usage (its ``done`` event's) for its day, at most once."""
        script(
            pipe,
            _COUNT,
            [self.key(client, now), keys.counted(client, stream_id)],
            [
                int(usage.get("prompt_tokens") or 0),
                int(usage.get("completion_tokens") or 0),
                1 if usage.get("estimated") else 0,
                self.ttl,
                COUNTED_TTL,
            ],
        )

    def read(self, client: str, now: float) -> dict[str, Any]:
        """The client's day: its counters and its budget (``GET /api/v1/usage``)."""
        raw = self.redis.hmget(
            self.key(client, now), "prompt_tokens", "completion_tokens", "generations"
        )
        prompt, completion, generations = (int(v) if v is not None else 0 for v in raw)
        remaining = None
        if self.budget is not None:
            remaining = max(0, self.budget - prompt - completion)
        return {
            "day": day_of(now),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "generations": generations,
            "budget": {
                "daily_tokens": self.budget,
                "remaining": remaining,
                "resets_at": resets_at(now),
            },
        }
