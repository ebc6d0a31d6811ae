"""The event log is complete by construction, whatever order its two writers' appends land in.

Regression (issue 14): the worker's flusher had seqs 1..52 in flight when a
generation's final pipeline appended 53..54; Redis ran the final append
first, refused the flush ("smaller than the top item"), and the refusal was
taken as harmless: event 52 was gone for every replay. Here each interleaving
is forced by executing the two writers' pipelines by hand, in a chosen order,
against the real redis-server.
"""

from __future__ import annotations

import secrets
from types import SimpleNamespace

import pytest

from streaming.core import keys
from streaming.core.eventlog import EventLog
from streaming.core.logreader import RemoteStream
from streaming.sse import encode_json, split_frames

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

RETENTION = 300


def frame(seq: int) -> bytes:
    return encode_json({"type": "token", "token": f"t{seq}"}, event="token", id=seq)


def generation(n: int) -> SimpleNamespace:
    """What the log needs of a Generation: its id, its frames, how many are logged."""
    return SimpleNamespace(
        stream_id="st_" + secrets.token_hex(16),
        frames=[frame(i) for i in range(1, n + 1)],
        flushed=0,
        done=False,
    )


def add_frames(gen: SimpleNamespace, n: int) -> None:
    start = len(gen.frames)
    gen.frames.extend(frame(i) for i in range(start + 1, start + n + 1))


@pytest.fixture()
def log(redis_client):
    return EventLog(redis_client, "test-worker", 20)


def seqs(frames: list[bytes]) -> list[int]:
    return [int(f.split(b"\n", 1)[0][4:]) for f in frames]


def logged(log: EventLog, gen) -> list[int]:
    return seqs(log.read(gen.stream_id, 0))


def queue(log: EventLog, gen):
    """One writer's pipeline with its append queued, not yet sent."""
    pipe = log.redis.pipeline(transaction=False)
    return pipe, log.append(pipe, gen)


def run(log: EventLog, writer) -> bool:
    pipe, append = writer
    return log.settle(append, pipe.execute(raise_on_error=False)[append.at])


def test_final_append_landing_before_the_in_flight_flush_loses_nothing(log):
    gen = generation(52)
    flush = queue(log, gen)  # the flusher's batch 1..52, in flight
    add_frames(gen, 2)
    gen.done = True
    final = queue(log, gen)  # the final pipeline: 53..54
    assert not run(log, final)  # Redis takes the final append first: refused, a gap
    assert gen.flushed == 0  # ... and the writer knows where the log ends
    assert log.write_rest(gen, RETENTION)
    assert run(log, flush)  # the flush lands late: already there, nothing refused
    assert logged(log, gen) == list(range(1, 55))


@pytest.mark.parametrize(
    "order",
    [
        ("flush", "final"),  # the usual order: no retry needed
        ("final", "flush", "retry"),  # the flush lands between the refusal and the retry
        ("final", "retry", "flush"),  # ... or after the retry
        ("final", "retry"),  # ... or never (its connection broke)
    ],
)
def test_every_order_of_the_two_writers_gives_the_whole_log_once(log, order):
    gen = generation(52)
    writers = {"flush": queue(log, gen)}
    add_frames(gen, 2)
    gen.done = True
    writers["final"] = queue(log, gen)
    for step in order:
        if step == "retry":
            assert log.write_rest(gen, RETENTION)
        elif step == "final":
            assert run(log, writers["final"]) == ("retry" not in order)
        else:
            assert run(log, writers["flush"])  # written, or already there: never refused
    assert logged(log, gen) == list(range(1, 55))


def test_a_refused_flush_is_retried_not_dropped(log):
    gen = generation(5)
    log.mark_dirty(gen)
    log.redis.xadd(keys.events(gen.stream_id), {"f": 1, "d": b"".join(gen.frames[:1])}, id="0-1")
    gen.flushed = 3  # as if a batch 2..3 had been sent and lost
    log.mark_dirty(gen)
    log.flush()  # 4..5 would leave a gap after 1: refused, flushed goes back to 1
    assert gen.flushed == 1 and gen.stream_id in log._dirty
    log.flush()
    assert logged(log, gen) == [1, 2, 3, 4, 5]


def test_a_log_that_vanished_is_written_again_from_the_start(log):
    gen = generation(10)
    log.mark_dirty(gen)
    log.flush()
    log.redis.delete(keys.events(gen.stream_id))  # a Redis restart without persistence
    add_frames(gen, 3)
    log.mark_dirty(gen)
    log.flush()
    log.flush()
    assert logged(log, gen) == list(range(1, 14))
    assert log.redis.ttl(keys.events(gen.stream_id)) > 0


def test_a_new_log_gets_a_ttl_and_the_final_retry_the_retention(log):
    gen = generation(3)
    log.mark_dirty(gen)
    log.flush()
    assert 0 < log.redis.ttl(keys.events(gen.stream_id)) <= 20
    gen.flushed = 0  # force the retry path to rewrite everything
    log.redis.delete(keys.events(gen.stream_id))
    assert log.write_rest(gen, RETENTION)
    assert log.redis.ttl(keys.events(gen.stream_id)) > 20


def test_a_lost_script_is_loaded_again(log):
    gen = generation(4)
    log.redis.script_flush()
    log.mark_dirty(gen)
    log.flush()  # NOSCRIPT: kept and the script loaded
    log.flush()
    assert logged(log, gen) == [1, 2, 3, 4]


def test_overlapping_entries_are_read_once_by_replay_and_by_remote_followers(log, redis_client):
    gen = generation(6)
    key = keys.events(gen.stream_id)
    redis_client.xadd(key, {"f": 1, "d": b"".join(gen.frames[0:4])}, id="0-4")
    redis_client.xadd(key, {"f": 3, "d": b"".join(gen.frames[2:6])}, id="0-6")
    assert logged(log, gen) == [1, 2, 3, 4, 5, 6]
    assert seqs(log.read(gen.stream_id, 3)) == [4, 5, 6]
    remote = RemoteStream(reader=None, stream_id=gen.stream_id)
    entries = redis_client.xrange(key)
    remote.add(entries[:1])
    remote.add(entries[1:])
    remote.add(entries)  # read again: nothing new
    assert seqs(remote.frames) == [1, 2, 3, 4, 5, 6] and remote.cursor == 6


def test_split_frames_reads_what_encode_json_wrote():
    frames = [frame(i) for i in range(1, 4)]
    assert split_frames(b"".join(frames)) == frames
