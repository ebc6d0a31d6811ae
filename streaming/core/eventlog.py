"""The Redis event log of each stream, for followers on other workers and for replay.

``sluice:events:{T}S`` (T: the stream's shard tag, `streaming.core.keys`) is a
Redis stream with one entry per flushed batch of SSE frames: entry id
``0-<last seq in the batch>``, fields ``f`` (first seq) and ``d`` (the frames,
each ending in a blank line). Live followers on the generation's own worker
never read it: they are fed in-process; followers on other workers read it
through the worker's one `streaming.core.logreader.LogReader`.

Appends are batched: a generation only marks itself dirty; one flusher
greenlet per worker writes every dirty stream's new frames every
`FLUSH_INTERVAL` in a single pipeline, so Redis sees a few commands per
stream per 100 ms, not one per token. The final frames (``done``) are written
by the generation's own final pipeline (`StreamManager.finished`).

Correct by construction. Two writers can have an append of the same stream in
flight at once (the flusher's batch and the final pipeline), and Redis may run
them in either order. Every append is one script (`_APPEND`) that reads the
log's top seq and then, atomically:

- writes the batch when it starts at or before ``top + 1`` (frames it shares
  with the log are written again; readers skip seqs they have);
- answers "already there" when ``top`` covers the batch;
- refuses the batch when it would leave a gap (``first > top + 1``), and
  answers ``top``: the writer rewinds to ``top`` and appends again from there.

So the log always holds seqs ``1..top`` without a gap, in order, whatever the
interleaving (`tests/test_eventlog.py` forces each one). A refused or failed
append is never dropped: the flusher rewinds and retries; the final writer
retries at once (`write_rest`). A log that vanished (Redis restarted, TTL ran
out) is rewritten from the generation's frames the same way.
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any

import gevent
import redis

from streaming.core import keys
from streaming.sse import split_frames

if TYPE_CHECKING:
    from streaming.core.generation import Generation

__all__ = ["Append", "EventLog", "frames_after"]

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1
LOG_MAXLEN = 10_000
WATCH_TTL = 3
FINAL_TRIES = 5

# KEYS: the log. ARGV: first seq, last seq, frames, maxlen, TTL for a new log.
# Returns {1, last} written, {0, top} already there, {-1, top} refused: a gap after top.
_APPEND = """
local first, last = tonumber(ARGV[1]), tonumber(ARGV[2])
local top = 0
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if newest then top = tonumber(string.match(newest[1], '%-(%d+)$')) end
if top >= last then return {0, top} end
if first > top + 1 then return {-1, top} end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], '0-' .. last, 'f', first, 'd', ARGV[3])
if top == 0 then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return {1, last}
"""


class Append:
    """One queued append: which frames, and where its reply sits in the pipeline."""

    __slots__ = ("gen", "first", "last", "at")

    def __init__(self, gen: Generation, first: int, last: int, at: int):
        self.gen, self.first, self.last, self.at = gen, first, last, at


class EventLog:
    def __init__(self, redis_client: redis.Redis, worker_id: str, live_ttl: int):
        self.redis = redis_client
        self.worker_id = worker_id
        self.live_ttl = live_ttl
        self._script_sha = hashlib.sha1(_APPEND.encode()).hexdigest()
        self._loaded = False  # the script is in Redis (loaded again after a NOSCRIPT)
        self._dirty: dict[str, Generation] = {}

    def forget(self, stream_id: str) -> None:
        self._dirty.pop(stream_id, None)

    def mark_dirty(self, gen: Generation) -> None:
        self._dirty[gen.stream_id] = gen

    # -- writing ----------------------------------------------------------------------

    def append(self, pipe: redis.client.Pipeline, gen: Generation) -> Append | None:
        """Queue the frames not yet in the log (one script call); None when there are none.

        ``gen.flushed`` moves on at once (the next flush must not send them again);
        `settle` moves it back if the append did not land.
        """
        first, last = gen.flushed + 1, len(gen.frames)
        if last < first:
            return None
        if not self._loaded:
            self._load()
        at = len(pipe)
        # EVALSHA without the pipeline's per-execute SCRIPT EXISTS round trip; a Redis
        # that lost its scripts answers NOSCRIPT, and `settle` loads it for the retry.
        pipe.execute_command(  # (a cluster pipeline refuses its evalsha method)
            "EVALSHA",
            self._script_sha,
            1,
            keys.events(gen.stream_id),
            first,
            last,
            b"".join(gen.frames[first - 1 : last]),
            LOG_MAXLEN,
            self.live_ttl,
        )
        gen.flushed = last
        return Append(gen, first, last, at)

    def settle(self, append: Append, reply: Any) -> bool:
        """Read an append's reply; True when the log now holds its frames.

        Otherwise the generation's ``flushed`` is moved back to what the log is
        known to hold, so that the next append starts there.
        """
        gen = append.gen
        if isinstance(reply, list) and len(reply) == 2 and reply[0] >= 0:
            return True
        if isinstance(reply, list) and len(reply) == 2:  # a gap after reply[1]
            gen.flushed = min(gen.flushed, int(reply[1]))
            return False
        if isinstance(reply, redis.exceptions.NoScriptError):
            self._loaded = False  # Redis restarted: load it before the next append
        else:
            logger.warning("event log append for %s failed: %s", gen.stream_id, reply)
        gen.flushed = min(gen.flushed, append.first - 1)
        return False

    def _load(self) -> None:
        try:
            self.redis.script_load(_APPEND)  # on every master of a cluster
        except redis.RedisError as exc:  # the append fails too, and is retried
            logger.warning("event log script load failed: %s", exc)
        else:
            self._loaded = True

    def flush_loop(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            if self._dirty:
                self.flush()

    def flush(self) -> None:
        batch, self._dirty = self._dirty, {}
        pipe = self.redis.pipeline(transaction=False)
        appends = [a for a in (self.append(pipe, gen) for gen in batch.values()) if a]
        if not appends:
            return
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            logger.warning("event log flush failed (%d streams), will retry: %s", len(batch), exc)
            replies = [exc] * (appends[-1].at + 1)
        for append in appends:
            gen = append.gen
            # A finished generation's frames are the final writer's to place (`write_rest`).
            if not self.settle(append, replies[append.at]) and not gen.done:
                self._dirty[gen.stream_id] = gen

    def write_rest(self, gen: Generation, retention: int) -> bool:
        """After the final pipeline refused or failed its append: place the rest now.

        Each try appends from what the log is known to hold, so a batch the
        flusher still has in flight can land before or after it: the log ends
        complete either way. False when Redis refused every try.
        """
        for _ in range(FINAL_TRIES):
            pipe = self.redis.pipeline(transaction=False)
            append = self.append(pipe, gen)
            if append is None:
                return True
            pipe.expire(keys.events(gen.stream_id), retention)
            try:
                reply = pipe.execute(raise_on_error=False)[append.at]
            except redis.RedisError as exc:
                reply = exc
            if self.settle(append, reply):
                return True
        logger.warning("stream %s: its last events could not be logged", gen.stream_id)
        return False

    def renew(self, pipe: redis.client.Pipeline, stream_id: str) -> None:
        """Keep a live stream's log (the owner's tick); its end sets the retention."""
        pipe.expire(keys.events(stream_id), self.live_ttl)

    # -- reading ----------------------------------------------------------------------

    def read(self, stream_id: str, after: int) -> list[bytes]:
        """Frames with seq > `after` in the log now (one XRANGE; a finished stream's replay)."""
        entries = self.redis.xrange(keys.events(stream_id), min=f"0-{after + 1}")
        return frames_after(entries, after)[0]

    def touch_watch(self, pipe: redis.client.Pipeline, stream_id: str) -> None:
        pipe.set(keys.watch(stream_id), self.worker_id, ex=WATCH_TTL)

    def watched_elsewhere(self, stream_id: str) -> bool:
        try:
            return bool(self.redis.exists(keys.watch(stream_id)))
        except redis.RedisError:
            return False


def frames_after(entries: list, after: int) -> tuple[list[bytes], int]:
    """The frames of log entries with seq > `after`, and the last seq they reach.

    Entries may overlap (an append can repeat frames the log has): seqs up to
    `after` are skipped, so every frame comes once, in order.
    """
    frames: list[bytes] = []
    for _entry_id, fields in entries:
        first = int(fields[b"f"])
        batch = split_frames(fields[b"d"])
        frames.extend(batch[max(0, after + 1 - first) :])
        after = max(after, first + len(batch) - 1)
    return frames, after
