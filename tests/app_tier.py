"""The in-process tier: `create_app(settings).test_client()` against the session's redis-server.

Settings are built from an explicit mapping (`load_settings(environ)` never
reads ``os.environ`` then), on a Redis database of their own (`APP_DB`), which
is flushed before every test: the gunicorn tier keeps db 0. The upstream is a
closed port: nothing in this tier may start a generation (the pytest process
is not gevent-monkey-patched), and `make_app` checks after each test that no
generation ran in-process.

The fixtures (`app_redis`, `app_cache`, `make_app`, `app_client`) are imported
by tests/conftest.py; the unit tier (tests/test_unit_*.py) uses `app_redis` too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from config.settings import Settings, load_settings
from devtools.harness import free_port

__all__ = [
    "APP_DB",
    "app_cache",
    "app_client",
    "app_redis",
    "app_settings",
    "db_url",
    "error_of",
    "free_port",
    "make_app",
]

APP_DB = 15  # the in-process and unit tiers' database; the gunicorn tier uses db 0
# A generation started by mistake reaches nothing here (and `make_app` fails the test).
NO_UPSTREAM = f"http://127.0.0.1:{free_port()}/v1"

BASE_ENV = {
    "APP_ENV": "test",
    "OPENAI_API_KEY": "sk-test",
    "ALLOWED_MODELS": "gpt-4o-mini,gpt-4o",
    "RATE_LIMIT_DEFAULT": "100000/minute",
    "RATE_LIMIT_STREAM": "100000/minute",
    "MAX_CONCURRENT_STREAMS": "1000",
}


def db_url(redis_server) -> str:
    return f"redis://127.0.0.1:{redis_server.port}/{APP_DB}"


def app_settings(redis_url: str, **env: str) -> Settings:
    """Settings from the tier's defaults plus `env` (variable names as in API.md)."""
    return load_settings(
        {**BASE_ENV, "REDIS_URL": redis_url, "OPENAI_BASE_URL": NO_UPSTREAM, **env}
    )


def error_of(response) -> tuple[int, str]:
    """(status, code) of a §3 error answer, checking its shape on the way."""
    assert response.mimetype == "application/json", response.data[:200]
    body = response.get_json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return response.status_code, body["error"]["code"]


@pytest.fixture()
def app_redis(redis_server) -> Iterator[redis.Redis]:
    """A client on the tier's database, flushed before the test."""
    client = redis.Redis.from_url(db_url(redis_server))
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def app_cache() -> Iterator[dict[tuple, Flask]]:
    """Apps on the tier's database, one per set of settings, reused across tests.

    Reused because building one costs ~70 ms (mostly two TLS contexts of the
    SDK client). Safe because every app here points at the same database: the
    rate limiter (one flask-limiter object per process) keeps the storage of
    the app built last, which is then the same Redis as everyone's.
    """
    cache: dict[tuple, Flask] = {}
    yield cache
    _close(cache)


def _close(cache: dict[tuple, Flask]) -> None:
    for app in reversed(list(cache.values())):
        core = app.extensions["sluice"]
        core.upstream.close()
        core.redis.close()
    cache.clear()


@pytest.fixture()
def make_app(redis_server, app_redis, app_cache) -> Iterator[Callable[..., Flask]]:
    """An app with extra settings: ``make_app(API_KEYS="k1,k2")``.

    ``redis_url`` (another Redis, e.g. a dead one) builds a fresh app, closed
    after the test together with the cached ones: the limiter then forgets its
    storage, and the next app built sets it again.
    """
    used: list[Flask] = []
    own: dict[tuple, Flask] = {}
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def make(redis_url: str | None = None, **env: str) -> Flask:
        key = (redis_url, *sorted(env.items()))
        cache = own if redis_url else app_cache
        app = cache.get(key)
        if app is None:
            app = create_app(app_settings(redis_url or db_url(redis_server), **env))
            app.testing = True
            cache[key] = app
        used.append(app)
        return app

    yield make
    try:
        for app in used:
            assert not app.extensions["sluice"].manager.local, "a generation started in-process"
    finally:
        for app in used:
            # kills the worker loops an admission spawned (never run: nothing yields to gevent)
            app.extensions["sluice"].manager.shutdown(timeout=0)
        if own:
            _close(own)
            _close(app_cache)
        # create_app installs its JSON log handler on the root logger: give it back
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture()
def app_client(make_app) -> FlaskClient:
    """An open-mode app's test client (no API_KEYS)."""
    return make_app().test_client()
