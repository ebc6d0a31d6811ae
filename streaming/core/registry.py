"""The stream registry in Redis: admission, each stream's entry, its end, dead workers.

``stream:S`` (`streaming.core.keys`) is a hash ``owner client worker state reason
created model session_id`` (+ ``ended events error`` once finished). While
the stream runs its TTL is `LIVE_TTL`, renewed every tick by the owning
worker (`streaming.core.upkeep`), so a crashed worker's entries expire on their
own; once finished it is kept for ``STREAM_RETENTION_SECONDS``.

Admission is one round trip (one pipeline) of three steps, each on the keys
of one owner of them, so each is single-slot on a Redis Cluster
(`streaming.core.keys`): the client's step, one script that reads what is left
of its daily token budget when there is one (`streaming.core.usage`) and takes
its concurrency slot (`streaming.core.slots`); the session's live lease when the
stream continues a session (`streaming.core.sessions`); and the stream's entry.
The steps are not one transaction: when one refuses or fails, the others that
succeeded are undone at once (`_undo`), and whatever an undo could not reach
expires by itself (the slot is a lease of `LIVE_TTL`, the session lease and the
entry have that TTL). Nobody else can see a refused stream's entry meanwhile:
its id was never given out. (Two starts racing for a client's last slot may
see a refused one's slot for that moment: the cost of not being one script.)
What is left of the budget comes back with the answer, and
`StreamManager.start` lowers the request's token caps to it.

Dead workers. Only Redis's own expiry is trusted, never another host's
clock: a worker whose ``worker:W`` key expired (no tick for `WORKER_TTL`) is
gone, and a stream it owned is recorded as finished (`bury`), freeing its slot.
Its usage is not counted: it has no ``done`` event (see `streaming.core.usage`).
"""

from __future__ import annotations

import logging
import time

import redis

from streaming.core import keys
from streaming.core.exceptions import BudgetExhausted, SessionBusy, TooManyStreams
from streaming.core.generation import GenerationRequest
from streaming.core.sessions import SessionStore
from streaming.core.slots import SLOT_LUA, Slots
from streaming.core.usage import BUDGET_LUA, Usage, resets_at
from streaming.redis_conn import script

__all__ = ["LIVE_TTL", "TICK", "WORKER_TTL", "Registry"]

logger = logging.getLogger(__name__)

TICK = 2.0  # the owning worker renews its entries this often
LIVE_TTL = 20
WORKER_TTL = 6  # three missed ticks

# The client's step. KEYS: slots, today's usage (only with a budget).
# ARGV: now, slot expiry, slot limit, stream id, slots key TTL, daily budget.
# Returns {status, left}: status 1 (slot taken), 0 (no free slot) or -2 (no budget
# left today); left: the budget left (-1: no budget).
_TAKE_SLOT = (
    BUDGET_LUA
    + SLOT_LUA
    + """
local left = -1
if KEYS[2] then
  left = budget_left(KEYS[2], ARGV[6])
  if left <= 0 then return {-2, 0} end
end
if not slot_free(KEYS[1], ARGV[1], ARGV[3]) then return {0, left} end
add_slot(KEYS[1], ARGV[2], ARGV[4], ARGV[5])
return {1, left}
"""
)

_REGISTER_MISSING = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""


def _flat(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


class Registry:
    def __init__(
        self,
        redis_client: redis.Redis,
        worker_id: str,
        slots: Slots,
        sessions: SessionStore,
        retention: int,
        usage: Usage | None = None,
    ):
        self.redis = redis_client
        self.worker_id = worker_id
        self.slots = slots
        self.sessions = sessions
        self.retention = retention
        self.usage = usage if usage is not None else Usage(redis_client, None)

    def fields(self, request: GenerationRequest, created: float) -> dict[str, str]:
        return {
            "owner": request.owner,
            "client": request.client,
            "worker": self.worker_id,
            "state": "running",
            "created": f"{created:.3f}",
            "model": request.model,
            "session_id": request.session_id or "",
        }

    def admit(self, request: GenerationRequest, now: float) -> int | None:
        """Budget and slot, session lease, entry: one round trip (see the module).

        Returns the client's token budget left today (None: no budget); a
        refusal raises its domain error and leaves nothing behind.
        """
        slots = self.slots
        budget = self.usage.budget
        slot_keys = [slots.key(request.client)]
        if budget is not None:
            slot_keys.append(self.usage.key(request.client, now))
        args = [now, now + slots.lease, slots.limit, request.stream_id, slots.lease * 2]
        args.append(budget if budget is not None else 0)
        entry = keys.registry(request.stream_id)
        pipe = self.redis.pipeline(transaction=False)
        script(pipe, _TAKE_SLOT, slot_keys, args)
        lease_key = None
        if request.session_id:
            lease_key = self.sessions.live_key(request.session_id)
            pipe.set(lease_key, request.stream_id, nx=True, ex=LIVE_TTL)
        pipe.hset(entry, mapping=self.fields(request, now))
        pipe.expire(entry, LIVE_TTL)
        replies = pipe.execute(raise_on_error=False)
        taken = replies[0]
        leased = replies[1] if lease_key else True
        failed = [r for r in replies if isinstance(r, Exception)]
        admitted = isinstance(taken, list) and taken[0] == 1
        if failed or not admitted or leased is not True:
            self._undo(request, admitted, lease_key if leased is True else None)
        if failed:
            raise failed[0]
        status, left = taken
        if status == -2:
            raise BudgetExhausted(
                f"The daily budget of {budget} tokens is used up; it resets at 00:00 UTC.",
                resets_at(now),
            )
        if status == 0:
            raise TooManyStreams(
                f"At most {slots.limit} live streams per client; wait for one to end."
            )
        if not leased:
            raise SessionBusy("This session is already generating an answer.")
        return left if budget is not None else None

    def _undo(self, request: GenerationRequest, slot: bool, lease_key: str | None) -> None:
        """A refused or failed admission: give back what its other steps took."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(keys.registry(request.stream_id))
        if slot:
            self.slots.release(pipe, request.client, request.stream_id)
        if lease_key:
            self.sessions.release_if_held(pipe, request.session_id, request.stream_id)
        try:
            pipe.execute()
        except redis.RedisError as exc:  # what stays behind expires within LIVE_TTL
            logger.warning("stream %s: admission undo failed: %s", request.stream_id, exc)

    def register_if_missing(
        self, pipe: redis.client.Pipeline, request: GenerationRequest, created: float
    ) -> None:
        """Write an entry a restarted Redis lost (never one its stream just marked finished)."""
        args = [LIVE_TTL, *_flat(self.fields(request, created))]
        script(pipe, _REGISTER_MISSING, [keys.registry(request.stream_id)], args)

    def info(self, stream_id: str, owner: str) -> dict[str, str] | None:
        """The entry, or None when unknown, expired or owned by someone else."""
        raw = self.redis.hgetall(keys.registry(stream_id))
        info = {k.decode(): v.decode() for k, v in raw.items()}
        if not info or info.get("owner") != owner:
            return None
        return info

    def mark_finished(
        self,
        pipe: redis.client.Pipeline,
        stream_id: str,
        reason: str,
        last_seq: int,
        error_code: str | None,
    ) -> None:
        """Queue the end of a stream: its state, reason and the seq of its ``done``."""
        fields = {
            "state": "finished",
            "reason": reason,
            "ended": f"{time.time():.3f}",
            "events": str(last_seq),  # the seq of `done` (a GET after it is a 204)
        }
        if error_code:
            fields["error"] = error_code
        pipe.hset(keys.registry(stream_id), mapping=fields)
        pipe.expire(keys.registry(stream_id), self.retention)

    def renew(self, pipe: redis.client.Pipeline, stream_id: str) -> None:
        pipe.expire(keys.registry(stream_id), LIVE_TTL)

    # -- dead workers -------------------------------------------------------------------

    def alive(self, pipe: redis.client.Pipeline) -> None:
        """Queue this worker's liveness mark (every tick)."""
        pipe.set(keys.worker(self.worker_id), "1", ex=WORKER_TTL)

    def worker_dead(self, worker_id: str, waited: float) -> bool:
        """Is that worker gone? A missing key counts once we waited longer than a tick:
        after a Redis restart every live worker writes its key again within `TICK`."""
        return waited > TICK + 0.5 and not self.redis.exists(keys.worker(worker_id))

    def bury(self, stream_id: str, info: dict[str, str]) -> None:
        """Record the end of a stream whose worker died, and free its slot and lease."""
        logger.warning(
            "stream %s: worker %s is gone; marking it finished", stream_id, info["worker"]
        )
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            keys.registry(stream_id),
            mapping={"state": "finished", "reason": "error", "error": "worker_lost"},
        )
        pipe.expire(keys.registry(stream_id), self.retention)
        self.slots.release(pipe, info.get("client", ""), stream_id)
        if info.get("session_id"):
            pipe.delete(self.sessions.live_key(info["session_id"]))
        pipe.execute()
