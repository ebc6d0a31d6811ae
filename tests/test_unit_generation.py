"""Unit: one generation, from admission to its single `finally`, in-process on real Redis.

A real `StreamManager` (real redis-server, real registry, event log and
session store) starts each `Generation` in its greenlet; the upstream is a
scripted stand-in with the interface the generation uses (`open` -> a stream
with ``pace``, ``iter_text``, ``close``, ``finish_reason``, ``usage``,
``deltas``), so every end can be forced exactly. The process is not
monkey-patched: gevent runs the generation's greenlet whenever this test
waits on a gevent event; Redis calls simply block, briefly. The manager's
worker loops (cancel listener, tick, flusher, watchdog) are not started: the
listener's blocking pub/sub read would stall an unpatched process. The tick
and the watchdog are called by hand instead. Streams over HTTP are the gunicorn
tier's.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import gevent
import gevent.event
import pytest
import redis

from streaming.core import keys
from streaming.core.generation import YIELD_EVERY, Generation, GenerationRequest
from streaming.core.manager import StreamManager
from streaming.core.sessions import SessionStore
from streaming.sse import parse
from streaming.upstream.client import UpstreamError
from tests.app_tier import app_settings, db_url

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

WAIT = 10  # seconds; every wait below ends long before unless something is broken


class ScriptedStream:
    """What `Upstream.open` returns, scripted: parts, then an optional wait, then an end."""

    extras = None  # text only (a /v1 generation's other deltas: tests/test_openai_tools.py)

    def __init__(self, parts, *, finish="stop", usage=None, fail=None, hold=None, after=()):
        self.parts, self.after = list(parts), list(after)
        self.finish_reason = None
        self._finish, self.usage, self._usage = finish, None, usage
        self.fail, self.hold = fail, hold
        self.deltas = 0
        self.closed = 0
        self.paced = None

    def pace(self, before_wait) -> None:
        self.paced = before_wait

    def iter_text(self) -> Iterator[str]:
        for part in self.parts:
            self.deltas += 1
            yield part
        if self.hold is not None:
            self.hold.wait()  # a silent upstream: the reader blocks (and yields to gevent)
        for part in self.after:
            self.deltas += 1
            yield part
        if self.fail is not None:
            raise self.fail
        self.finish_reason, self.usage = self._finish, self._usage

    def close(self) -> None:
        self.closed += 1


class ScriptedUpstream:
    def __init__(self):
        self.next: ScriptedStream | Exception | None = None
        self.opened: list[dict] = []

    def open(self, **params) -> ScriptedStream:
        self.opened.append(params)
        stream, self.next = self.next, None
        if isinstance(stream, Exception):
            raise stream
        assert stream is not None, "no scripted stream"
        return stream


@pytest.fixture()
def upstream() -> ScriptedUpstream:
    return ScriptedUpstream()


@pytest.fixture()
def manager(redis_server, app_redis, upstream, monkeypatch) -> Iterator[StreamManager]:
    settings = app_settings(db_url(redis_server), MAX_CONCURRENT_STREAMS="3")
    client = redis.Redis.from_url(db_url(redis_server))
    manager = StreamManager(client, settings, upstream)
    monkeypatch.setattr(manager, "_ensure_running", lambda: None)  # see the module docstring
    yield manager
    try:
        assert not manager.local, "a generation outlived its test"
    finally:
        manager.shutdown(timeout=WAIT)
        client.close()


def start(manager, upstream, stream, session_id=None, prompt="hello there") -> Generation:
    upstream.next = stream
    new = [{"role": "user", "content": prompt}]
    req = GenerationRequest(
        stream_id="st_" + secrets.token_hex(16),
        owner="public",
        model="gpt-4o-mini",
        messages=new,
        new_messages=new,
        max_tokens=50,
        session_id=session_id,
        client="10.0.0.9",
    )
    return manager.start(req)


def finish(gen: Generation) -> list[tuple[str, dict]]:
    assert gen.ended.wait(WAIT), "the generation did not end"
    return events(gen.frames)


def events(frames: list[bytes]) -> list[tuple[str, dict]]:
    """(name, data) of each frame, read with the SSE module's own reader; ids count from 1."""
    parsed = parse(b"".join(frames))
    assert len(parsed) == len(frames)
    assert [e["id"] for e in parsed] == [str(seq) for seq in range(1, len(frames) + 1)]
    out = []
    for event in parsed:
        data = json.loads(event["data"])
        assert data["type"] == event["event"]
        out.append((event["event"], data))
    return out


def entry(app_redis, stream_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in app_redis.hgetall(keys.registry(stream_id)).items()}


def test_start_exists_before_the_upstream_is_called(manager, upstream, app_redis):
    gen = start(manager, upstream, ScriptedStream(["a"]))
    # nothing has yielded to gevent yet: the reader has not run, `start` is already there
    assert upstream.opened == [] and len(gen.frames) == 1
    (name, data), = events(gen.frames)  # fmt: skip
    assert name == "start"
    assert data == {
        "type": "start",
        "stream_id": gen.stream_id,
        "session_id": None,
        "model": "gpt-4o-mini",
        "created": int(gen.created),
    }
    assert entry(app_redis, gen.stream_id)["state"] == "running"
    assert manager.local[gen.stream_id] is gen
    finish(gen)


def test_normal_end(manager, upstream, app_redis):
    stream = ScriptedStream(["Hel", "lo", "!"], usage={"prompt_tokens": 7, "completion_tokens": 3})
    gen = start(manager, upstream, stream)
    got = finish(gen)
    assert upstream.opened == [
        {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 50,
        }
    ]
    # deltas read without waiting leave as one token event
    assert [name for name, _ in got] == ["start", "token", "done"]
    assert got[1][1] == {"type": "token", "token": "Hello!", "index": 0}
    done = got[-1][1]
    assert (done["finished"], done["reason"]) == (True, "stop")
    assert done["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "estimated": False}
    assert done["metadata"]["token_count"] == 3 and done["metadata"]["ttft_ms"] is not None
    assert stream.closed == 1 and stream.paced is not None
    assert gen.done and gen.reason == "stop" and "".join(gen.text) == "Hello!"
    assert gen.stream_id not in manager.local
    # the final pipeline: entry finished, slot released, the whole log written
    info = entry(app_redis, gen.stream_id)
    assert (info["state"], info["reason"], info["events"]) == ("finished", "stop", "3")
    assert "error" not in info
    assert not app_redis.zscore(keys.slots("10.0.0.9"), gen.stream_id)
    assert manager.log.read(gen.stream_id, 0) == gen.frames


def test_a_reader_that_waits_sends_what_it_has_first(manager, upstream):
    hold = gevent.event.Event()
    gen = start(manager, upstream, ScriptedStream(["a", "b"], hold=hold, after=["c"]))
    first = gevent.event.Event()
    gen.waiters.add(first)
    assert first.wait(WAIT)  # `start` was there: wait for the next event
    first.clear()
    while len(gen.frames) < 2:
        assert first.wait(WAIT)
        first.clear()
    assert events(gen.frames)[1][1]["token"] == "ab"  # out while the upstream is silent
    hold.set()
    got = finish(gen)
    assert [(n, d.get("token")) for n, d in got] == [
        ("start", None),
        ("token", "ab"),
        ("token", "c"),
        ("done", None),
    ]
    assert [d["index"] for n, d in got if n == "token"] == [0, 1]


def test_a_fast_upstream_yields_every_few_chunks(manager, upstream):
    parts = [f"{i} " for i in range(YIELD_EVERY * 2 + 1)]
    gen = start(manager, upstream, ScriptedStream(parts))
    got = finish(gen)
    tokens = [d["token"] for n, d in got if n == "token"]
    assert "".join(tokens) == "".join(parts) and len(tokens) >= 2


@pytest.mark.parametrize(("finish_reason", "reason"), [("length", "length"), ("stop", "stop")])
def test_length_and_estimated_usage(manager, upstream, finish_reason, reason):
    gen = start(
        manager, upstream, ScriptedStream(["abcdefgh"], finish=finish_reason), prompt="x" * 40
    )
    done = finish(gen)[-1][1]
    assert done["reason"] == reason
    assert done["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "estimated": True}


@pytest.mark.parametrize(
    ("script", "code", "text"),
    [
        (UpstreamError("upstream_rate_limited", "The model provider is rate limiting."),
         "upstream_rate_limited", ""),
        (ScriptedStream(["par", "tial"], fail=UpstreamError("upstream_error", "cut off")),
         "upstream_error", "partial"),
        (RuntimeError("a bug"), "internal_error", ""),
        (ScriptedStream(["x"], fail=ValueError("a bug mid-stream")), "internal_error", "x"),
    ],
    ids=["refused", "cut-off", "bug-at-open", "bug-mid-stream"],
)  # fmt: skip
def test_failures_end_with_error_then_one_done(manager, upstream, app_redis, script, code, text):
    gen = start(manager, upstream, script)
    got = finish(gen)
    names = [n for n, _ in got]
    assert names[-2:] == ["error", "done"] and names.count("done") == 1
    assert got[-2][1]["error"]["code"] == code and got[-2][1]["error"]["message"]
    assert got[-1][1]["reason"] == "error"
    assert "".join(d["token"] for n, d in got if n == "token") == text
    if isinstance(script, ScriptedStream):
        assert script.closed == 1
    info = entry(app_redis, gen.stream_id)
    assert (info["state"], info["reason"], info["error"]) == ("finished", "error", code)


def test_cancel_while_relaying_closes_the_upstream(manager, upstream, app_redis):
    session_id = manager.sessions.create("public", "t")["session_id"]
    hold = gevent.event.Event()  # never set: the upstream goes silent after "par"
    stream = ScriptedStream(["par"], hold=hold)
    gen = start(manager, upstream, stream, session_id=session_id)
    token = gevent.event.Event()
    gen.waiters.add(token)
    while len(gen.frames) < 2:
        assert token.wait(WAIT)
        token.clear()
    assert manager.cancel(gen.stream_id, "public") == "cancelled"
    got = events(gen.frames)
    assert [n for n, _ in got] == ["start", "token", "done"]
    assert got[-1][1]["reason"] == "cancelled"
    assert stream.closed == 1 and not hold.is_set()
    assert entry(app_redis, gen.stream_id)["reason"] == "cancelled"
    assert manager.cancel(gen.stream_id, "public") == "finished"  # idempotent
    # the partial reply is saved, marked interrupted, and the session is free again
    messages = manager.sessions.messages(session_id)
    assert [(m["role"], m["content"], m.get("interrupted")) for m in messages] == [
        ("user", "hello there", None),
        ("assistant", "par", True),
    ]
    assert not app_redis.exists(SessionStore.live_key(session_id))


def test_stopped_before_it_ran_never_calls_the_upstream(manager, upstream):
    gen = start(manager, upstream, ScriptedStream(["never"]))
    manager.shutdown(timeout=WAIT)  # worker shutdown before the reader got to run
    got = events(gen.frames)
    assert upstream.opened == []
    assert [n for n, _ in got] == ["start", "error", "done"]
    assert got[1][1]["error"]["code"] == "interrupted"
    assert got[2][1]["reason"] == "error"
    assert got[2][1]["usage"]["estimated"] is True


def test_watchdog_silence_before_and_after_the_head(manager, upstream):
    hold = gevent.event.Event()
    gen = start(manager, upstream, ScriptedStream([], hold=hold))
    gen.upstream_silent()  # before the reader ran: the provider "did not answer"
    got = finish(gen)
    assert got[-2][1]["error"] == {
        "code": "upstream_timeout",
        "message": "The model provider did not answer.",
    }
    gen = start(manager, upstream, ScriptedStream(["a"], hold=hold))
    token = gevent.event.Event()
    gen.waiters.add(token)
    while len(gen.frames) < 2:
        assert token.wait(WAIT)
        token.clear()
    gen.upstream_silent()
    got = finish(gen)
    assert got[-2][1]["error"]["message"] == "The model provider went silent."
    assert [n for n, _ in got] == ["start", "token", "error", "done"]


def test_a_successful_turn_is_saved_to_the_session(manager, upstream, app_redis):
    session_id = manager.sessions.create("public", "t")["session_id"]
    gen = start(manager, upstream, ScriptedStream(["fine"]), session_id=session_id)
    assert app_redis.get(SessionStore.live_key(session_id)).decode() == gen.stream_id
    assert finish(gen)[0][1]["session_id"] == session_id
    messages = manager.sessions.messages(session_id)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "hello there"),
        ("assistant", "fine"),
    ]
    assert all("interrupted" not in m for m in messages)
    assert not app_redis.exists(SessionStore.live_key(session_id))


def test_the_tick_renews_restores_and_catches_cancel_flags(manager, upstream, app_redis):
    hold = gevent.event.Event()
    gen = start(manager, upstream, ScriptedStream(["a"], hold=hold))
    app_redis.delete(keys.registry(gen.stream_id))  # as after a Redis restart
    app_redis.delete(keys.slots("10.0.0.9"))
    manager.upkeep.tick()
    assert entry(app_redis, gen.stream_id)["state"] == "running"
    assert app_redis.zscore(keys.slots("10.0.0.9"), gen.stream_id)
    assert app_redis.exists(keys.worker(manager.worker_id))
    # a DELETE on another worker sets the flag; pub/sub may have lost its message
    app_redis.set(keys.cancel_flag(gen.stream_id), "1")
    manager.upkeep.tick()
    got = finish(gen)
    assert got[-1][1]["reason"] == "cancelled"
    assert not app_redis.exists(keys.cancel_flag(gen.stream_id))
    assert entry(app_redis, gen.stream_id)["reason"] == "cancelled"
