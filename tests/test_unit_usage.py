"""Unit: usage counting and the daily budget (`streaming.core.usage`) on the real redis-server.

The final pipeline is a real `StreamManager` (real registry, event log and
Redis) whose generations read a scripted stand-in upstream, as in
tests/test_unit_generation.py: every end, and every interleaving of an end
with a cancel, can be forced exactly. The manager's worker loops are not
started (their blocking reads would stall this unpatched process). Streams
over HTTP, on gunicorn, are tests/test_usage.py's.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from streaming.core import keys
from streaming.core.exceptions import BudgetExhausted
from streaming.core.generation import GenerationRequest, StreamStopped
from streaming.core.manager import StreamManager
from streaming.core.registry import LIVE_TTL, Registry
from streaming.core.sessions import SessionStore
from streaming.core.slots import Slots
from streaming.core.usage import (
    USAGE_TTL,
    Usage,
    cap,
    day_of,
    resets_at,
)
from tests.app_tier import app_settings, db_url

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

WAIT = 10
CLIENT = "10.0.0.7"


class Stream:
    """What `Upstream.open` returns: parts, then `at_end()` (if any), then the end."""

    def __init__(self, parts, usage=None, at_end: Callable[[], None] | None = None):
        self.parts, self._usage, self.at_end = parts, usage, at_end
        self.finish_reason, self.usage, self.deltas = None, None, 0
        self.extras: list = []  # no deltas other than text here

    def pace(self, before_wait) -> None:
        pass

    def iter_text(self) -> Iterator[str]:
        for part in self.parts:
            self.deltas += 1
            yield part
        if self.at_end is not None:
            self.at_end()
        self.finish_reason, self.usage = "stop", self._usage

    def close(self) -> None:
        pass


class Upstream:
    def __init__(self):
        self.next: Stream | None = None
        self.opened: list[dict] = []

    def open(self, **params) -> Stream:
        self.opened.append(params)
        stream, self.next = self.next, None
        return stream


@pytest.fixture()
def upstream() -> Upstream:
    return Upstream()


@pytest.fixture()
def make_manager(redis_server, app_redis, upstream, monkeypatch):
    made = []

    def make(**env: str) -> StreamManager:
        settings = app_settings(db_url(redis_server), **env)
        client = redis.Redis.from_url(db_url(redis_server))
        manager = StreamManager(client, settings, upstream)
        monkeypatch.setattr(manager, "_ensure_running", lambda: None)  # see the docstring
        made.append((manager, client))
        return manager

    yield make
    for manager, client in made:
        try:
            assert not manager.local, "a generation outlived its test"
        finally:
            manager.shutdown(timeout=WAIT)
            client.close()


def request(prompt: str = "hello there", **kw) -> GenerationRequest:
    messages = [{"role": "user", "content": prompt}]
    return GenerationRequest(
        stream_id="st_" + secrets.token_hex(16),
        owner="public",
        model="gpt-4o-mini",
        messages=messages,
        new_messages=messages,
        client=kw.pop("client", CLIENT),
        **kw,
    )


def counters(app_redis, client: str = CLIENT) -> dict[str, int]:
    raw = app_redis.hgetall(keys.usage(client, day_of(time.time())))
    return {k.decode(): int(v) for k, v in raw.items()}


def usage_key(client: str = CLIENT) -> str:
    return keys.usage(client, day_of(time.time()))


# -- the final pipeline counts, once --------------------------------------------------


def test_a_finished_generation_adds_its_done_usage(make_manager, upstream, app_redis):
    manager = make_manager()
    upstream.next = Stream(["Hel", "lo"], usage={"prompt_tokens": 7, "completion_tokens": 2})
    gen = manager.start(request())
    assert gen.ended.wait(WAIT)
    assert counters(app_redis) == {"prompt_tokens": 7, "completion_tokens": 2, "generations": 1}
    assert 0 < app_redis.ttl(usage_key()) <= USAGE_TTL
    assert app_redis.get(keys.counted(CLIENT, gen.stream_id)) == b"1"


def test_the_final_pipeline_run_twice_counts_once(make_manager, upstream, app_redis):
    """Whatever reaches the final pipeline a second time (a resent pipeline, a second
    path to `finished`) finds the stream's `counted` mark and adds nothing."""
    manager = make_manager()
    upstream.next = Stream(["abcd"], usage={"prompt_tokens": 5, "completion_tokens": 1})
    gen = manager.start(request())
    assert gen.ended.wait(WAIT)
    manager.local[gen.stream_id] = gen  # as if it were still live, then finish it again
    manager.finished(gen, None)
    manager.finished(gen, "upstream_error")
    assert counters(app_redis) == {"prompt_tokens": 5, "completion_tokens": 1, "generations": 1}


def test_an_end_that_lands_while_a_cancel_arrives_is_counted_once(
    make_manager, upstream, app_redis
):
    """The DELETE's stop arrives at the very moment the upstream finishes: the generation
    ends through its one `finally` with the reason it had; the DELETE then finds it
    finished; the usage is counted once, the one its `done` says."""
    manager = make_manager()
    holder: dict = {}

    def cancel_now() -> None:  # runs in the reader, between the last chunk and the end
        holder["gen"].stop(StreamStopped("cancelled"))

    upstream.next = Stream(
        ["one ", "two"], usage={"prompt_tokens": 4, "completion_tokens": 2}, at_end=cancel_now
    )
    gen = holder["gen"] = manager.start(request())
    assert gen.ended.wait(WAIT)
    assert gen.reason == "stop"
    assert manager.cancel(gen.stream_id, "public") == "finished"
    assert counters(app_redis) == {"prompt_tokens": 4, "completion_tokens": 2, "generations": 1}


def test_a_cancel_before_the_end_counts_the_estimate_once(make_manager, upstream, app_redis):
    manager = make_manager()
    holder: dict = {}

    def cancel_and_throw() -> None:
        holder["gen"].stop(StreamStopped("cancelled"))
        raise StreamStopped("cancelled")  # the throw the hub would deliver at the next wait

    upstream.next = Stream(["x" * 40], at_end=cancel_and_throw)
    gen = holder["gen"] = manager.start(request(prompt="p" * 40))
    assert gen.ended.wait(WAIT)
    assert gen.reason == "cancelled"
    assert manager.cancel(gen.stream_id, "public") == "finished"
    # the done event's estimate: 40 characters each way, 4 per token
    assert counters(app_redis) == {
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "generations": 1,
        "estimated": 1,
    }


def test_counters_are_per_client_and_day(make_manager, upstream, app_redis):
    manager = make_manager()
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.2"):
        upstream.next = Stream(["a"], usage={"prompt_tokens": 3, "completion_tokens": 1})
        assert manager.start(request(client=client)).ended.wait(WAIT)
    assert counters(app_redis, "10.0.0.1")["generations"] == 1
    assert counters(app_redis, "10.0.0.2") == {
        "prompt_tokens": 6,
        "completion_tokens": 2,
        "generations": 2,
    }


# -- the budget in the admission script -------------------------------------------------


def make_registry(app_redis, budget: int | None) -> Registry:
    slots = Slots(2, LIVE_TTL)
    sessions = SessionStore(app_redis, ttl=600, max_messages=50)
    return Registry(app_redis, "host:1:abc", slots, sessions, 300, Usage(app_redis, budget))


def test_admission_returns_what_is_left(app_redis):
    registry = make_registry(app_redis, 1000)
    assert registry.admit(request(), time.time()) == 1000
    app_redis.hset(usage_key(), mapping={"prompt_tokens": 300, "completion_tokens": 200})
    assert registry.admit(request(), time.time()) == 500


def test_without_a_budget_admission_reads_no_usage(app_redis):
    registry = make_registry(app_redis, None)
    app_redis.hset(usage_key(), mapping={"prompt_tokens": 10**9})
    assert registry.admit(request(), time.time()) is None


@pytest.mark.parametrize("used", [1000, 1001, 5000])
def test_nothing_left_is_budget_exhausted_and_writes_nothing(app_redis, used):
    registry = make_registry(app_redis, 1000)
    app_redis.hset(usage_key(), mapping={"prompt_tokens": used - 1, "completion_tokens": 1})
    refused = request(session_id="se_" + "a" * 32)
    now = time.time()
    with pytest.raises(BudgetExhausted) as info:
        registry.admit(refused, now)
    assert info.value.code == "budget_exhausted" and "1000" in info.value.message
    assert info.value.resets_at == resets_at(now)
    assert not app_redis.exists(keys.registry(refused.stream_id))
    assert not app_redis.exists(keys.slots(CLIENT))
    assert not app_redis.exists(SessionStore.live_key("se_" + "a" * 32))
    other = request(client="10.0.0.8")  # another client's budget is its own
    assert registry.admit(other, now) == 1000


def test_the_budget_is_checked_before_the_slot(app_redis):
    registry = make_registry(app_redis, 1000)
    for _ in range(2):
        registry.admit(request(), time.time())  # both slots taken
    app_redis.hset(usage_key(), mapping={"completion_tokens": 1000})
    with pytest.raises(BudgetExhausted):
        registry.admit(request(), time.time())


# -- reading, the day, the caps ------------------------------------------------------------


def test_read_never_shows_a_negative_remaining(app_redis):
    usage = Usage(app_redis, 100)
    now = time.time()
    app_redis.hset(
        usage_key(), mapping={"prompt_tokens": 90, "completion_tokens": 30, "generations": 2}
    )
    assert usage.read(CLIENT, now) == {
        "day": day_of(now),
        "prompt_tokens": 90,
        "completion_tokens": 30,
        "generations": 2,
        "budget": {"daily_tokens": 100, "remaining": 0, "resets_at": resets_at(now)},
    }
    empty = Usage(app_redis, None).read("10.9.9.9", now)
    assert (empty["prompt_tokens"], empty["generations"]) == (0, 0)
    assert empty["budget"] == {"daily_tokens": None, "remaining": None, "resets_at": resets_at(now)}


def test_days_are_utc():
    assert day_of(0) == "1970-01-01" and day_of(86399.9) == "1970-01-01"
    assert day_of(86400) == "1970-01-02"
    assert resets_at(0) == 86400 and resets_at(86399.9) == 86400 and resets_at(86400) == 172800


def test_cap_lowers_every_cap_present_and_sets_max_tokens_when_none():
    prompt = "p" * 40
    assert cap(request(prompt), 100).max_tokens == 100  # what remains (API.md §10)
    assert cap(request(prompt, max_tokens=20), 100).max_tokens == 20
    assert cap(request(prompt, max_tokens=500), 100).max_tokens == 100
    assert cap(request(prompt), 0).max_tokens == 1  # admitted: at least one token

    both = cap(request(prompt, max_tokens=500, max_completion_tokens=30), 100)
    assert (both.max_tokens, both.max_completion_tokens) == (100, 30)
    only = cap(request(prompt, max_completion_tokens=500), 100)
    assert (only.max_tokens, only.max_completion_tokens) == (None, 100)
    assert cap(request(prompt), 100).max_completion_tokens is None


def test_a_budget_caps_the_request_the_upstream_gets(make_manager, upstream, app_redis):
    manager = make_manager(TOKEN_BUDGET_DAILY="100")
    app_redis.hset(usage_key(), mapping={"prompt_tokens": 40})
    upstream.next = Stream(["a"], usage={"prompt_tokens": 10, "completion_tokens": 1})
    gen = manager.start(request("p" * 40, max_tokens=1000))
    assert gen.ended.wait(WAIT)
    assert upstream.opened[0]["max_tokens"] == 100 - 40  # what remains (API.md §10)
    assert gen.request.max_tokens == 60
