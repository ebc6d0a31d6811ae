"""Unit: the stream registry (`streaming.core.registry`) on the real redis-server.

Admission is one round trip of single-slot steps: the client's concurrency slot,
the session's live lease and the registry entry; a refusal undoes the others
(nothing is left behind) and is a domain error
(`streaming.core.exceptions`), never an HTTP status. No gevent, no upstream: the
registry is plain Redis calls. (The event log has tests/test_eventlog.py.)
"""

from __future__ import annotations

import secrets
import time

import pytest

from streaming.core import keys
from streaming.core.exceptions import SessionBusy, StreamingError, TooManyStreams
from streaming.core.generation import GenerationRequest
from streaming.core.registry import LIVE_TTL, TICK, WORKER_TTL, Registry
from streaming.core.sessions import SessionStore
from streaming.core.slots import Slots

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

RETENTION = 300
WORKER = "host:1:abc"


def make_registry(redis_client, limit: int = 2, worker: str = WORKER) -> Registry:
    slots = Slots(limit, LIVE_TTL)
    sessions = SessionStore(redis_client, ttl=600, max_messages=50)
    return Registry(redis_client, worker, slots, sessions, RETENTION)


def request(client: str = "10.0.0.1", session_id: str | None = None, **kw) -> GenerationRequest:
    return GenerationRequest(
        stream_id="st_" + secrets.token_hex(16),
        owner=kw.pop("owner", "public"),
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        session_id=session_id,
        client=client,
        **kw,
    )


def entry(redis_client, stream_id: str) -> dict[str, str]:
    raw = redis_client.hgetall(keys.registry(stream_id))
    return {k.decode(): v.decode() for k, v in raw.items()}


def slot_members(redis_client, client: str) -> set[str]:
    return {m.decode() for m in redis_client.zrange(keys.slots(client), 0, -1)}


@pytest.fixture()
def registry(app_redis) -> Registry:
    return make_registry(app_redis)


def test_admission_writes_the_entry_the_slot_and_the_lease(registry, app_redis):
    req = request(session_id="se_" + "a" * 32, owner="key:abc")
    now = time.time()
    registry.admit(req, now)
    assert entry(app_redis, req.stream_id) == {
        "owner": "key:abc",
        "client": "10.0.0.1",
        "worker": WORKER,
        "state": "running",
        "created": f"{now:.3f}",
        "model": "gpt-4o-mini",
        "session_id": "se_" + "a" * 32,
    }
    assert 0 < app_redis.ttl(keys.registry(req.stream_id)) <= LIVE_TTL
    score = app_redis.zscore(keys.slots("10.0.0.1"), req.stream_id)
    assert score == pytest.approx(now + LIVE_TTL, abs=0.01)  # the slot is a lease
    assert 0 < app_redis.ttl(keys.slots("10.0.0.1")) <= 2 * LIVE_TTL
    lease = SessionStore.live_key("se_" + "a" * 32)
    assert app_redis.get(lease).decode() == req.stream_id
    assert 0 < app_redis.ttl(lease) <= LIVE_TTL
    assert registry.info(req.stream_id, "key:abc")["state"] == "running"


def test_without_a_session_no_lease_is_taken(registry, app_redis):
    req = request()
    registry.admit(req, time.time())
    assert entry(app_redis, req.stream_id)["session_id"] == ""
    assert not list(app_redis.scan_iter(keys.session("*")))


def test_no_free_slot_is_too_many_streams_and_writes_nothing(registry, app_redis):
    held = [request(), request()]
    for req in held:
        registry.admit(req, time.time())
    refused = request(session_id="se_" + "b" * 32)
    with pytest.raises(TooManyStreams) as info:
        registry.admit(refused, time.time())
    assert isinstance(info.value, StreamingError) and info.value.code == "too_many_streams"
    assert "2" in info.value.message
    assert not app_redis.exists(keys.registry(refused.stream_id))
    assert slot_members(app_redis, "10.0.0.1") == {r.stream_id for r in held}
    assert not app_redis.exists(SessionStore.live_key("se_" + "b" * 32))  # slot checked first


def test_slots_are_per_client(registry, app_redis):
    for _ in range(2):
        registry.admit(request("10.0.0.1"), time.time())
    other = request("10.0.0.2")
    registry.admit(other, time.time())
    assert slot_members(app_redis, "10.0.0.2") == {other.stream_id}


def test_expired_slot_leases_do_not_count(registry, app_redis):
    """A killed worker's slots free themselves: leases past their expiry are dropped."""
    now = time.time()
    app_redis.zadd(keys.slots("10.0.0.1"), {"st_dead1": now - 1, "st_dead2": now - 0.001})
    req = request()
    registry.admit(req, now)
    assert slot_members(app_redis, "10.0.0.1") == {req.stream_id}


def test_a_released_slot_is_free_again(registry, app_redis):
    held = [request(), request()]
    for req in held:
        registry.admit(req, time.time())
    pipe = app_redis.pipeline()
    registry.slots.release(pipe, "10.0.0.1", held[0].stream_id)
    pipe.execute()
    registry.admit(request(), time.time())


def test_a_busy_session_is_session_busy_and_takes_no_slot(registry, app_redis):
    session_id = "se_" + "c" * 32
    first = request(session_id=session_id)
    registry.admit(first, time.time())
    second = request(session_id=session_id)
    with pytest.raises(SessionBusy) as info:
        registry.admit(second, time.time())
    assert info.value.code == "session_busy"
    assert not app_redis.exists(keys.registry(second.stream_id))
    assert slot_members(app_redis, "10.0.0.1") == {first.stream_id}
    assert app_redis.get(SessionStore.live_key(session_id)).decode() == first.stream_id
    # another session of the same client is free
    registry.admit(request(session_id="se_" + "d" * 32), time.time())


def test_info_is_none_for_unknown_and_for_another_owner(registry):
    req = request(owner="key:one")
    registry.admit(req, time.time())
    assert registry.info(req.stream_id, "key:one")["owner"] == "key:one"
    assert registry.info(req.stream_id, "key:two") is None
    assert registry.info(req.stream_id, "public") is None
    assert registry.info("st_" + "0" * 32, "key:one") is None


@pytest.mark.parametrize("error", [None, "upstream_error"])
def test_mark_finished_keeps_the_entry_for_the_retention(registry, app_redis, error):
    req = request()
    registry.admit(req, time.time())
    pipe = app_redis.pipeline()
    registry.mark_finished(pipe, req.stream_id, "error" if error else "stop", 9, error)
    pipe.execute()
    got = entry(app_redis, req.stream_id)
    assert (got["state"], got["reason"], got["events"]) == (
        "finished",
        "error" if error else "stop",
        "9",
    )
    assert got.get("error") == error
    assert float(got["ended"]) >= float(got["created"])
    assert LIVE_TTL < app_redis.ttl(keys.registry(req.stream_id)) <= RETENTION


def test_register_if_missing_restores_a_lost_entry_but_never_a_finished_one(registry, app_redis):
    req = request(session_id="se_" + "e" * 32)
    created = time.time()
    registry.admit(req, created)
    before = entry(app_redis, req.stream_id)
    app_redis.delete(keys.registry(req.stream_id))  # a Redis restart lost it
    pipe = app_redis.pipeline()
    registry.register_if_missing(pipe, req, created)
    pipe.execute()
    assert entry(app_redis, req.stream_id) == before
    assert 0 < app_redis.ttl(keys.registry(req.stream_id)) <= LIVE_TTL
    pipe = app_redis.pipeline()
    registry.mark_finished(pipe, req.stream_id, "stop", 3, None)
    registry.register_if_missing(pipe, req, created)
    pipe.execute()
    assert entry(app_redis, req.stream_id)["state"] == "finished"


def test_worker_liveness_is_judged_by_redis_expiry(registry, app_redis):
    assert not registry.worker_dead(WORKER, waited=TICK)  # may not have ticked yet
    assert registry.worker_dead(WORKER, waited=TICK + 1)
    pipe = app_redis.pipeline()
    registry.alive(pipe)
    pipe.execute()
    assert 0 < app_redis.ttl(keys.worker(WORKER)) <= WORKER_TTL
    assert not registry.worker_dead(WORKER, waited=TICK + 1)
    assert registry.worker_dead("host:2:def", waited=TICK + 1)


def test_bury_ends_a_dead_workers_stream_and_frees_its_slot_and_lease(registry, app_redis):
    session_id = "se_" + "f" * 32
    req = request(session_id=session_id)
    registry.admit(req, time.time())
    registry.bury(req.stream_id, registry.info(req.stream_id, "public"))
    got = entry(app_redis, req.stream_id)
    assert (got["state"], got["reason"], got["error"]) == ("finished", "error", "worker_lost")
    assert LIVE_TTL < app_redis.ttl(keys.registry(req.stream_id)) <= RETENTION
    assert slot_members(app_redis, "10.0.0.1") == set()
    assert not app_redis.exists(SessionStore.live_key(session_id))
    registry.admit(request(session_id=session_id), time.time())  # the session is free again


def test_a_step_that_fails_undoes_the_others(registry, app_redis):
    """Admission is single-slot steps (Redis Cluster): when one fails (here the entry's
    key holds a list: WRONGTYPE), the slot and the lease the others took are given back."""
    import redis

    session_id = "se_" + "e" * 32
    req = request(session_id=session_id)
    app_redis.rpush(keys.registry(req.stream_id), "not a hash")
    with pytest.raises(redis.ResponseError):
        registry.admit(req, time.time())
    assert slot_members(app_redis, "10.0.0.1") == set()
    assert not app_redis.exists(SessionStore.live_key(session_id))
    assert not app_redis.exists(keys.registry(req.stream_id))
    registry.admit(request(session_id=session_id), time.time())  # all free again
