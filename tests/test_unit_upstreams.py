"""Unit: UPSTREAMS_FILE checked at startup, the breaker on the real redis-server, failover
in one generation with scripted upstreams (API.md section 11).

The generation tests use the scripted stand-ins of tests/test_unit_generation.py
(one per upstream, in a `Router`), so every end can be forced exactly: which
attempt fails, how, before or after its first delta, and that each failed
response is closed before the next upstream is asked.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import time

import gevent
import pytest
import redis

from config.settings import SettingsError, load_settings
from devtools.harness import ROOT, VENV_BIN, free_port, wait_for
from streaming.core import keys
from streaming.core.manager import StreamManager
from streaming.redis_conn import RedisGate
from streaming.upstream.breaker import CLOSED, HALF_OPEN, OPEN, Breaker
from streaming.upstream.client import UpstreamError
from streaming.upstream.routing import Router, Target
from streaming.upstream.upstreams import UpstreamSpec
from tests.app_tier import app_settings, db_url
from tests.test_unit_generation import (
    WAIT,
    ScriptedStream,
    ScriptedUpstream,
    finish,
    start,
)
from tests.test_upstreams import upstreams_toml

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

GOOD = {
    "name": "primary",
    "base_url": "https://api.example.com/v1",
    "api_key_env": "PRIMARY_KEY",
    "models": ["gpt-4o-mini", "gpt-4o"],
}
BACKUP = {
    "name": "backup",
    "base_url": "http://backup.internal:8080/v1",
    "api_key_env": "BACKUP_KEY",
    "models": ["gpt-4o-mini"],
    "model_map": {"gpt-4o-mini": "provider/gpt-4o-mini"},
}


def settings_with(tmp_path, *entries, raw: str | None = None, **env):
    path = tmp_path / "upstreams.toml"
    path.write_text(raw if raw is not None else upstreams_toml(*entries))
    return load_settings({"UPSTREAMS_FILE": str(path), **env})


# -- the file -------------------------------------------------------------------------


def test_a_good_file(tmp_path):
    s = settings_with(tmp_path, GOOD, BACKUP, PRIMARY_KEY="k1", BACKUP_KEY="k2")
    assert [u.name for u in s.upstreams] == ["primary", "backup"]
    assert (s.upstreams[0].api_key, s.upstreams[1].api_key) == ("k1", "k2")
    assert s.models == ("gpt-4o-mini", "gpt-4o")  # the union, in file order
    assert s.upstreams[1].upstream_model("gpt-4o-mini") == "provider/gpt-4o-mini"
    assert s.upstreams[0].upstream_model("gpt-4o-mini") == "gpt-4o-mini"
    narrowed = settings_with(tmp_path, GOOD, BACKUP, ALLOWED_MODELS="gpt-4o-mini")
    assert narrowed.models == ("gpt-4o-mini",)
    assert settings_with(tmp_path, GOOD, ALLOWED_MODELS="").models == ("gpt-4o-mini", "gpt-4o")
    # production: each upstream's key is required, OPENAI_API_KEY is not
    prod = {"APP_ENV": "production", "REDIS_URL": "redis://h", "SECRET_KEY": "s"}
    assert settings_with(tmp_path, GOOD, **prod, PRIMARY_KEY="k").upstreams[0].api_key == "k"


@pytest.mark.parametrize(
    ("entries", "env", "words"),
    [
        (
            [{**GOOD, "base_url": None}],
            {},
            "upstream 'primary' (entry 1): missing field 'base_url'",
        ),
        (
            [GOOD, {**BACKUP, "weight": 2}],
            {},
            "upstream 'backup' (entry 2): unknown field 'weight'",
        ),
        ([GOOD, {**BACKUP, "name": "primary"}], {}, "upstream 'primary' (entry 2): duplicate"),
        (
            [GOOD, BACKUP],
            {"PRIMARY_KEY": "k"},
            "upstream 'backup' (entry 2): api_key_env: BACKUP_KEY",
        ),
        ([{**GOOD, "base_url": "ftp://x/v1"}], {}, "upstream 'primary' (entry 1): base_url"),
        ([{**GOOD, "base_url": "http://:99/v1"}], {}, "upstream 'primary' (entry 1): base_url"),
        (
            [{**BACKUP, "model_map": {"gpt-4o": "x"}}],
            {},
            "upstream 'backup' (entry 1): model_map: 'gpt-4o' is not in models",
        ),
        ([{**GOOD, "models": []}], {}, "upstream 'primary' (entry 1): models"),
        ([{**GOOD, "name": "a{b}"}], {}, "(entry 1): name: 1 to 64"),
        ([{**GOOD, "models": ["gpt-4o"]}], {}, "LLM_MODEL must be one of"),
    ],
    ids=[
        "missing-field",
        "unknown-field",
        "duplicate-name",
        "unset-key-in-production",
        "bad-scheme",
        "no-host",
        "model-map-key",
        "no-models",
        "bad-name",
        "default-model-not-served",
    ],
)
def test_a_bad_file_names_the_entry(tmp_path, entries, env, words):
    entries = [{k: v for k, v in e.items() if v is not None} for e in entries]
    if "api_key_env" in words:
        env = {"APP_ENV": "production", "REDIS_URL": "redis://h", "SECRET_KEY": "s", **env}
    with pytest.raises(SettingsError) as info:
        settings_with(tmp_path, *entries, **env)
    message = str(info.value)
    assert words in message and "\n" not in message
    assert message.startswith("invalid settings: UPSTREAMS_FILE") or "LLM_MODEL" in message


def test_an_unreadable_or_invalid_file(tmp_path):
    with pytest.raises(SettingsError, match="not valid TOML"):
        settings_with(tmp_path, raw="[[upstream]\nname=")
    with pytest.raises(SettingsError, match="no \\[\\[upstream\\]\\] entry"):
        settings_with(tmp_path, raw="")
    with pytest.raises(SettingsError, match="cannot be read"):
        load_settings({"UPSTREAMS_FILE": str(tmp_path / "missing.toml")})


def test_a_bad_file_stops_gunicorn_with_one_line(tmp_path):
    path = tmp_path / "upstreams.toml"
    path.write_text(upstreams_toml(GOOD, {**BACKUP, "models": ["gpt-4o"]}))
    result = subprocess.run(
        [str(VENV_BIN / "gunicorn"), "-c", "config/gunicorn.conf.py", "app:app"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "UPSTREAMS_FILE": str(path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sluice: invalid settings: UPSTREAMS_FILE {path}: upstream 'backup' (entry 2): "
        "model_map: 'gpt-4o-mini' is not in models"
    ]


def test_head_timeout_never_above_the_upstream_timeout():
    assert load_settings({"UPSTREAM_TIMEOUT_SECONDS": "3"}).upstream_head_timeout == 3
    assert load_settings({}).upstream_head_timeout == 10
    with pytest.raises(SettingsError, match="UPSTREAM_HEAD_TIMEOUT_SECONDS"):
        load_settings({"UPSTREAM_TIMEOUT_SECONDS": "3", "UPSTREAM_HEAD_TIMEOUT_SECONDS": "5"})


def test_allowed_models_no_upstream_serves_are_said_at_startup(tmp_path, app_redis, caplog):
    s = settings_with(tmp_path, BACKUP, ALLOWED_MODELS="gpt-4o-mini,gpt-4o")
    assert s.models == ("gpt-4o-mini",)
    with caplog.at_level(logging.WARNING, logger="streaming.upstream.routing"):
        Router.from_settings(s, app_redis, RedisGate())
    (record,) = [r for r in caplog.records if "ALLOWED_MODELS" in r.getMessage()]
    assert record.models == ["gpt-4o"]


# -- the breaker ----------------------------------------------------------------------


@pytest.fixture()
def breaker(app_redis):
    return Breaker(app_redis, RedisGate(), threshold=2, cooldown=0.3, lease=5)


def _until(app_redis, name) -> int:
    return int(app_redis.hget(keys.breaker(name), "until"))


def test_breaker_opens_skips_then_lets_one_probe(breaker, app_redis):
    name = "u" + secrets.token_hex(3)
    ticket = breaker.acquire(name)
    assert ticket is not None and not ticket.probe and ticket.fails == 0
    breaker.failure(name, ticket)
    assert breaker.states([name]) == {name: CLOSED}
    breaker.failure(name, breaker.acquire(name))  # the threshold: open
    assert breaker.acquire(name) is None and breaker.states([name]) == {name: OPEN}
    until = _until(app_redis, name)
    wait_for(lambda: time.time() * 1000 > until, 5, "the cooldown to pass")
    assert breaker.states([name]) == {name: HALF_OPEN}
    probes = [breaker.acquire(name) for _ in range(20)]  # each call is one atomic script
    assert [t.probe for t in probes if t is not None] == [True]
    probe = next(t for t in probes if t is not None)
    breaker.failure(name, probe)  # a failed probe: a full cooldown again
    assert breaker.acquire(name) is None and _until(app_redis, name) >= until + 300
    until = _until(app_redis, name)
    wait_for(lambda: time.time() * 1000 > until, 5, "the cooldown to pass")
    probe = breaker.acquire(name)
    breaker.release(name, probe)  # no verdict (cancelled): the next request probes
    probe = breaker.acquire(name)
    assert probe is not None and probe.probe
    breaker.success(name, probe)  # a good probe closes it
    assert not app_redis.exists(keys.breaker(name))
    assert breaker.acquire(name) == breaker.acquire(name) and breaker.acquire(name).fails == 0


def test_a_success_resets_the_count(breaker, app_redis):
    name = "u" + secrets.token_hex(3)
    breaker.failure(name, breaker.acquire(name))
    ticket = breaker.acquire(name)
    assert ticket.fails == 1
    breaker.success(name, ticket)
    breaker.failure(name, breaker.acquire(name))
    assert breaker.acquire(name) is not None  # 1 consecutive failure, not 2


def test_redis_down_the_breaker_fails_open():
    dead = redis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1, socket_timeout=1
    )
    gate = RedisGate()
    breaker = Breaker(dead, gate, threshold=1, cooldown=30, lease=5)
    ticket = breaker.acquire("any")
    assert ticket is not None and not ticket.known  # treated as closed: the request goes on
    breaker.failure("any", ticket)  # dropped, no exception
    assert gate.is_open()  # and Redis is not asked again for a moment
    assert breaker.acquire("any") is not None and breaker.states(["any"]) == {}
    dead.close()


# -- failover in one generation ----------------------------------------------------------


def spec(name: str, **model_map: str) -> UpstreamSpec:
    return UpstreamSpec(name, None, "k", ("gpt-4o-mini",), model_map)


@pytest.fixture()
def pair(redis_server, app_redis, monkeypatch):
    """A manager whose router has two scripted upstreams and a real breaker."""
    settings = app_settings(db_url(redis_server), MAX_CONCURRENT_STREAMS="10")
    client = redis.Redis.from_url(db_url(redis_server))
    first, second = ScriptedUpstream(), ScriptedUpstream()
    gate = RedisGate()
    suffix = secrets.token_hex(3)
    breaker = Breaker(client, gate, threshold=3, cooldown=30, lease=5)
    router = Router(
        [
            Target(spec("a" + suffix), first, None),
            Target(spec("b" + suffix, **{"gpt-4o-mini": "m"}), second, None),
        ],
        breaker,
        pooled=True,
    )
    manager = StreamManager(client, settings, router, gate)
    monkeypatch.setattr(manager, "_ensure_running", lambda: None)
    yield manager, first, second, suffix
    try:
        assert not manager.local
    finally:
        manager.shutdown(timeout=WAIT)
        client.close()


def _done(got):
    return got[-1][1]


def test_failover_closes_the_failed_response_and_maps_the_model(pair):
    manager, first, second, suffix = pair
    broken = ScriptedStream([], fail=UpstreamError("upstream_error", "dropped"))
    first.next = broken
    gen = start(
        manager,
        second,
        ScriptedStream(["Hi", "!"], usage={"prompt_tokens": 2, "completion_tokens": 2}),
    )
    got = finish(gen)
    assert broken.closed == 1  # closed before the second upstream was asked
    assert [n for n, _ in got] == ["start", "token", "done"]
    meta = _done(got)["metadata"]
    assert (meta["upstream"], meta["failed_over"]) == ("b" + suffix, ["a" + suffix])
    assert first.opened[0]["model"] == "gpt-4o-mini" and second.opened[0]["model"] == "m"
    assert _done(got)["usage"]["completion_tokens"] == 2  # the backup's usage, once


def test_no_failover_once_a_delta_was_relayed(pair):
    manager, first, second, suffix = pair
    first.next = ScriptedStream(["par"], fail=UpstreamError("upstream_error", "dropped"))
    gen = start(manager, second, ScriptedStream(["never"]))
    got = finish(gen)
    assert second.opened == [] and second.next is not None
    second.next = None
    assert [n for n, _ in got] == ["start", "token", "error", "done"]
    assert got[-2][1]["error"]["code"] == "upstream_error"
    assert _done(got)["metadata"]["failed_over"] == []


def test_a_4xx_is_not_failed_over(pair):
    manager, first, second, _ = pair
    first.next = UpstreamError("upstream_error", "HTTP 400", retryable=False)
    gen = start(manager, second, ScriptedStream(["never"]))
    got = finish(gen)
    second.next = None
    assert got[-2][1]["error"]["code"] == "upstream_error" and second.opened == []


def test_all_failed_is_upstream_unavailable_naming_the_last(pair):
    manager, first, second, suffix = pair
    first.next = UpstreamError("upstream_rate_limited", "The model provider is rate limiting.")
    gen = start(manager, second, UpstreamError("upstream_error", "HTTP 503"))
    got = finish(gen)
    error = got[-2][1]["error"]
    assert error["code"] == "upstream_unavailable"
    assert f"b{suffix}: HTTP 503" in error["message"]
    assert _done(got)["metadata"] == {
        **_done(got)["metadata"],
        "upstream": None,
        "failed_over": ["a" + suffix, "b" + suffix],
    }


def test_a_cancelled_probe_gives_its_lease_back(pair, app_redis):
    manager, first, second, suffix = pair
    name = "a" + suffix
    app_redis.hset(keys.breaker(name), mapping={"fails": 3, "until": 1})  # cooled down
    hold = gevent.event.Event()
    first.next = ScriptedStream([], hold=hold)
    gen = start(manager, second, ScriptedStream(["never"]))
    deadline = time.monotonic() + WAIT
    while not first.opened and time.monotonic() < deadline:
        gevent.sleep(0.01)  # a gevent wait: the generation's greenlet runs meanwhile
    assert app_redis.hget(keys.breaker(name), "probe") is not None
    manager.cancel(gen.stream_id, "public")
    got = finish(gen)
    second.next = None
    assert _done(got)["reason"] == "cancelled"
    assert app_redis.hget(keys.breaker(name), "probe") is None


def test_simulator_directives_scoped_to_one_simulator():
    from devtools.simulator import parse_directives

    text = "hi sim:primary.fail=503 sim:tokens=3 sim:backup.hang=2"
    assert parse_directives(text, "primary") == ({"fail": 503, "tokens": 3}, "hi")
    assert parse_directives(text, "backup") == ({"tokens": 3, "hang": 2.0}, "hi")
    assert parse_directives(text) == ({"tokens": 3}, "hi")  # the same text everywhere
    with pytest.raises(ValueError, match="bad simulator directive"):
        parse_directives("sim:primary.bogus=1")
