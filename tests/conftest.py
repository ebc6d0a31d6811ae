from __future__ import annotations

import itertools
import os

import pytest
import redis

from devtools.harness import RedisServer, Simulator, Sluice
from tests.app_tier import app_cache, app_client, app_redis, make_app  # noqa: F401 (in-process tier)

_tags = itertools.count()


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def simulator():
    sim = Simulator("--tokens", "20", "--rate", "200", "--delay", "0.05").start()
    yield sim
    sim.stop()


@pytest.fixture()
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture()
def fresh_limits(redis_client):
    """Forget every rate-limit counter and slot (all test traffic shares one client IP)."""
    for key in redis_client.scan_iter("sluice:rl*"):
        redis_client.delete(key)
    for key in redis_client.scan_iter("sluice:slots:*"):
        redis_client.delete(key)


@pytest.fixture()
def tag(request) -> str:
    """A unique simulator tag for this test's upstream requests."""
    return f"t{os.getpid()}-{next(_tags)}-{request.node.name[:40]}".replace("[", "-").replace(
        "]", ""
    )


def _sluice_env(redis_server, simulator, **extra: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_server.url,
        "OPENAI_BASE_URL": simulator.v1,
        "OPENAI_API_KEY": "sk-test",
        "HEARTBEAT_SECONDS": "1",
        "DISCONNECT_GRACE_SECONDS": "0",
        "UPSTREAM_TIMEOUT_SECONDS": "3",
        "UPSTREAM_HEAD_TIMEOUT_SECONDS": "3",  # never above the upstream timeout (settings)
        "ALLOWED_MODELS": "gpt-4o-mini,gpt-4o",
        # the suite's own requests all come from 127.0.0.1: limits are tested on their own servers
        "RATE_LIMIT_DEFAULT": "100000/minute",
        "RATE_LIMIT_STREAM": "100000/minute",
        "MAX_CONCURRENT_STREAMS": "1000",
        **extra,
    }


@pytest.fixture(scope="session")
def sluice(redis_server, simulator):
    """Two gevent workers, heartbeat 1 s, no grace window, upstream timeout 3 s."""
    server = Sluice(_sluice_env(redis_server, simulator)).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def make_sluice(redis_server, simulator):
    """Start extra servers with other settings (stopped at the end of the session)."""
    started: list[Sluice] = []

    def make(workers: int = 2, **env: str) -> Sluice:
        server = Sluice(_sluice_env(redis_server, simulator, **env), workers=workers).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.begin_stop()
    for server in started:
        server.stop()
