"""Settings: every variable typed, validated once, errors naming the variable."""

from __future__ import annotations

import subprocess

import pytest

from config.settings import SettingsError, load_settings
from devtools.harness import ROOT, VENV_BIN

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def test_defaults_match_the_contract():
    s = load_settings({})
    assert (s.llm_model, s.models, s.api_keys, s.trusted_proxies) == (
        "gpt-4o-mini",
        ("gpt-4o-mini",),
        (),
        0,
    )
    assert (s.rate_limit_default, s.rate_limit_stream) == ("100/minute", "10/minute")
    assert (s.max_concurrent_streams, s.heartbeat_seconds, s.disconnect_grace_seconds) == (5, 15, 5)
    assert (s.stream_retention_seconds, s.upstream_timeout_seconds) == (300, 60)
    assert (s.max_body_bytes, s.max_prompt_chars) == (262_144, 32_000)
    assert (s.session_ttl_seconds, s.session_max_messages) == (604_800, 50)
    assert (s.send_timeout_seconds, s.relay_interval_ms) == (30, 100)


def test_comma_lists():
    s = load_settings({"ALLOWED_MODELS": " gpt-4o-mini, gpt-4o ,", "API_KEYS": "k1,k2"})
    assert s.models == ("gpt-4o-mini", "gpt-4o") and s.api_keys == ("k1", "k2")
    assert s.authenticated


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"MAX_CONCURRENT_STREAMS": "many"}, "MAX_CONCURRENT_STREAMS"),
        ({"HEARTBEAT_SECONDS": "0"}, "HEARTBEAT_SECONDS"),
        ({"DISCONNECT_GRACE_SECONDS": "-1"}, "DISCONNECT_GRACE_SECONDS"),
        ({"RELAY_INTERVAL_MS": "-5"}, "RELAY_INTERVAL_MS"),
        ({"RELAY_INTERVAL_MS": "2000"}, "RELAY_INTERVAL_MS"),
        ({"RATE_LIMIT_STREAM": "lots"}, "RATE_LIMIT_STREAM"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"APP_ENV": "staging"}, "APP_ENV"),
        ({"ALLOWED_MODELS": "gpt-4o"}, "ALLOWED_MODELS"),
        ({"APP_ENV": "production", "OPENAI_API_KEY": "k", "SECRET_KEY": "s"}, "REDIS_URL"),
        ({"APP_ENV": "production", "REDIS_URL": "redis://h", "SECRET_KEY": "s"}, "OPENAI_API_KEY"),
        ({"APP_ENV": "production", "REDIS_URL": "redis://h", "OPENAI_API_KEY": "k"}, "SECRET_KEY"),
    ],
)
def test_bad_values_name_the_variable(env, names):
    with pytest.raises(SettingsError, match=names):
        load_settings(env)


def _gunicorn(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "gunicorn"), "-c", "config/gunicorn.conf.py", "app:app"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_bad_value_stops_startup_with_one_line():
    result = _gunicorn({"MAX_CONCURRENT_STREAMS": "abc"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sluice: invalid setting MAX_CONCURRENT_STREAMS: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


def test_production_refuses_embedded_fallbacks():
    result = _gunicorn({"APP_ENV": "production", "OPENAI_API_KEY": "k", "SECRET_KEY": "s"})
    assert result.returncode == 2
    assert "REDIS_URL is required when APP_ENV=production" in result.stderr
    assert "embedded" not in result.stderr
