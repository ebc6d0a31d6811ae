"""The Redis event log of each stream, for followers on other workers and for replay.

``sluice:events:S`` is a Redis stream with one entry per flushed batch of SSE
frames: entry id ``0-<last seq in the batch>``, fields ``f`` (first seq) and
``d`` (the frames, each ending in a blank line). Live followers on the
generation's own worker never read it: they are fed in-process.

Appends are batched: a generation only marks itself dirty; one flusher
greenlet per worker writes every dirty stream's new frames every
`FLUSH_INTERVAL` in a single pipeline, so Redis sees a few commands per
stream per 100 ms, not one per token (the TTL is set on the first append and
renewed by the manager's tick). The final frames (``done``) are written
by the generation's own final pipeline. A failed flush (Redis away) is kept
and retried. Readers replay with XRANGE and follow with XREAD BLOCK.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gevent
import redis

if TYPE_CHECKING:
    from streaming.generation import Generation

__all__ = ["EventLog"]

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.1
LOG_MAXLEN = 10_000
WATCH_TTL = 3


def _key(kind: str, stream_id: str) -> str:
    return f"sluice:{kind}:{stream_id}"


class EventLog:
    def __init__(self, redis_client: redis.Redis, worker_id: str, live_ttl: int):
        self.redis = redis_client
        self.worker_id = worker_id
        self.live_ttl = live_ttl
        self._dirty: dict[str, Generation] = {}

    def forget(self, stream_id: str) -> None:
        self._dirty.pop(stream_id, None)

    def mark_dirty(self, gen: Generation) -> None:
        self._dirty[gen.stream_id] = gen

    def append(self, pipe: redis.client.Pipeline, gen: Generation) -> bool:
        """Queue the frames not yet in the log (one XADD); False when there are none."""
        first, last = gen.flushed, len(gen.frames)
        if last <= first:
            return False
        pipe.xadd(
            _key("events", gen.stream_id),
            {"f": first + 1, "d": b"".join(gen.frames[first:last])},
            id=f"0-{last}",
            maxlen=LOG_MAXLEN,
            approximate=True,
        )
        gen.flushed = last
        return True

    def flush_loop(self) -> None:
        while True:
            gevent.sleep(FLUSH_INTERVAL)
            if self._dirty:
                self.flush()

    def flush(self) -> None:
        batch, self._dirty = self._dirty, {}
        before = {sid: gen.flushed for sid, gen in batch.items()}
        pipe = self.redis.pipeline(transaction=False)
        appended = []  # (stream id, index of its XADD reply)
        for gen in batch.values():
            at = len(pipe)
            if self.append(pipe, gen):
                appended.append((gen.stream_id, at))
                if before[gen.stream_id] == 0:  # a new key: give it a TTL (the tick renews it)
                    pipe.expire(_key("events", gen.stream_id), self.live_ttl)
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            logger.warning("event log flush failed (%d streams), will retry: %s", len(batch), exc)
            failed = list(batch)
        else:
            refused = [
                (sid, replies[at])
                for sid, at in appended
                if isinstance(replies[at], redis.ResponseError)
                and "smaller" not in str(replies[at])
            ]
            failed = [sid for sid, _ in refused]
            if refused:  # e.g. OOM under noeviction: keep the frames and try again
                logger.warning(
                    "event log append refused for %d streams: %s", len(refused), refused[0][1]
                )
        for sid in failed:
            gen = batch[sid]
            if not gen.done:
                gen.flushed = min(gen.flushed, before[sid])
                self._dirty[sid] = gen

    def read(self, stream_id: str, after: int, block_ms: int | None) -> list[bytes]:
        """Frames with seq > `after` from the Redis log; waits up to `block_ms` for new ones."""
        key = _key("events", stream_id)
        if block_ms is None:
            entries = self.redis.xrange(key, min=f"0-{after + 1}")
        else:
            reply = self.redis.xread({key: f"0-{after}"}, block=block_ms)
            entries = reply[0][1] if reply else []
        frames: list[bytes] = []
        for _entry_id, fields in entries:
            first = int(fields[b"f"])
            batch = fields[b"d"].split(b"\n\n")[:-1]
            frames.extend(frame + b"\n\n" for frame in batch[max(0, after + 1 - first) :])
            after = max(after, first + len(batch) - 1)
        return frames

    def touch_watch(self, stream_id: str) -> None:
        self.redis.set(_key("watch", stream_id), self.worker_id, ex=WATCH_TTL)

    def watched_elsewhere(self, stream_id: str) -> bool:
        try:
            return bool(self.redis.exists(_key("watch", stream_id)))
        except redis.RedisError:
            return False
