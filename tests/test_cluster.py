"""REDIS_URL=redis+cluster:// on a real Redis Cluster, through two Sluice servers.

3 masters + 3 replicas on loopback (Debian's redis-server 7, built here by
`devtools.harness.RedisClusterNodes`), two gunicorn servers with 2 gevent workers
each on the cluster URL: streaming, cancel across servers, resume with no loss,
session turns, rate limits and usage; then a master is SIGKILLed, its replica is
promoted (awaited in CLUSTER SLOTS / CLUSTER INFO), and streams and cancels work
again within 20 s of the promotion, with no restart of Sluice.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest

from devtools.harness import RedisClusterNodes, Sluice, wait_for
from streaming.core import keys
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(120)]

STREAM = "/api/v1/completions/stream"
_ips = itertools.count(1)


@pytest.fixture(scope="module")
def cluster():
    if not os.access(RedisClusterNodes.BINARY, os.X_OK):
        pytest.fail("Debian's redis-server is needed (apt-get install redis-server)")
    nodes = RedisClusterNodes().start()
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def pair(cluster, simulator):
    env = {
        "REDIS_URL": cluster.url,
        "OPENAI_BASE_URL": simulator.v1,
        "OPENAI_API_KEY": "sk-test",
        "HEARTBEAT_SECONDS": "1",
        "DISCONNECT_GRACE_SECONDS": "5",
        "UPSTREAM_TIMEOUT_SECONDS": "5",
        "UPSTREAM_HEAD_TIMEOUT_SECONDS": "5",
        "TRUSTED_PROXIES": "1",  # each test is a client of its own (X-Forwarded-For)
        "RATE_LIMIT_DEFAULT": "40/minute",
        "RATE_LIMIT_STREAM": "1000/minute",
        "MAX_CONCURRENT_STREAMS": "50",
    }
    servers = [Sluice(env, workers=2).start(), Sluice(env, workers=2).start()]
    yield servers
    for server in servers:
        server.begin_stop()
    for server in servers:
        server.stop()


def fresh() -> dict[str, str]:
    """A client of its own (open mode: streams belong to everyone, limits count per IP)."""
    n = next(_ips)
    return {"X-Forwarded-For": f"10.{21 + n // 250}.{os.getpid() % 250}.{n % 250}"}


@pytest.fixture()
def client() -> dict[str, str]:
    return fresh()


def text_of(events) -> str:
    return "".join(e["data"]["token"] for e in events if e["event"] == "token")


def test_stream_and_cancel_across_servers(pair, cluster, simulator, client, tag):
    a, b = pair
    assert request(a.base, "GET", "/ready")[0] == 200
    done = EventStream(a.base, STREAM, {"prompt": "x sim:tokens=5"}, headers=client).read_all()
    assert done[0]["event"] == "start" and done[-1]["data"]["reason"] == "stop"
    for _ in range(4):  # streams of several shards, on every master
        stream = EventStream(
            a.base,
            STREAM,
            {"prompt": f"long sim:tokens=9999 sim:rate=30 sim:tag={tag}"},
            headers=client,
        )
        stream.until("token")
        started = time.monotonic()
        status, _, body = request(b.base, "DELETE", f"{STREAM}/{stream.stream_id}", headers=client)
        assert (status, body["status"]) == (200, "cancelled")
        assert time.monotonic() - started < 1.0
        assert stream.read_all()[-1]["data"]["reason"] == "cancelled"
        assert simulator.record(tag, timeout=2)["state"] == "client_closed"
    # the cancel bus is sharded pub/sub: each listening worker holds every shard's
    # channels, each on the master of its slot (a worker listens once it served a stream)
    for k in range(keys.SHARDS):
        channel = keys.shard_channels(k)[0]
        with cluster.node(cluster.master_of(channel)) as node:
            wait_for(
                lambda n=node, c=channel: 1 <= n.pubsub_shardnumsub(c)[0][1] <= 4,
                10,
                f"workers on {channel}",
            )


def test_resume_on_the_other_server_loses_nothing(pair, client):
    a, b = pair
    stream = EventStream(
        a.base, STREAM, {"prompt": "resume sim:tokens=80 sim:rate=60"}, headers=client
    )
    for _ in range(5):
        stream.next_event()
    seen = list(stream.events)
    stream.close()
    resumed = EventStream(
        b.base,
        f"{STREAM}/{stream.stream_id}",
        method="GET",
        headers={**client, "Last-Event-ID": seen[-1]["id"]},
    )
    events = seen + resumed.read_all()
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["data"]["reason"] == "stop"
    whole = EventStream(
        b.base, STREAM, {"prompt": "resume sim:tokens=80 sim:rate=60"}, headers=client
    )
    assert text_of(events) == text_of(whole.read_all())  # the same text, uninterrupted


def test_session_turns_usage_and_rate_limits(pair, client):
    a, b = pair
    status, _, session = request(a.base, "POST", "/api/v1/sessions", {"title": "t"}, client)
    assert status == 201
    sid = session["session_id"]
    for server, prompt in ((a, "first sim:tokens=4"), (b, "second sim:tokens=4")):
        events = EventStream(
            server.base, STREAM, {"prompt": prompt, "session_id": sid}, headers=client
        ).read_all()
        assert events[-1]["data"]["reason"] == "stop"
    status, _, history = request(b.base, "GET", f"/api/v1/sessions/{sid}", headers=client)
    assert status == 200
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"] * 2
    status, _, usage = request(a.base, "GET", "/api/v1/usage", headers=client)
    assert status == 200 and usage["generations"] == 2 and usage["completion_tokens"] > 0
    # one rate-limit budget (40/minute) shared by both servers and all four workers
    # (50 requests: more than the budget even if a new minute began just before)
    statuses = [
        request((a, b)[i % 2].base, "GET", "/api/v1/usage", headers=client)[0] for i in range(50)
    ]
    assert statuses.count(429) >= 1 and 200 in statuses
    status, headers, body = request(a.base, "GET", "/api/v1/usage", headers=client)
    assert status == 429 and body["error"]["code"] == "rate_limited" and headers["retry-after"]


def start_on(server: Sluice, client, prompt: str, master: int, cluster, deadline: float):
    """Start streams until one lands on `master` (its shard's slot); 503s are retried."""
    while time.monotonic() < deadline:
        stream = EventStream(server.base, STREAM, {"prompt": prompt}, headers=fresh())
        if stream.status != 200:  # that master's slots are not served yet: a 503, never a 500
            assert (stream.status, stream.json()["error"]["code"]) == (503, "redis_unavailable")
            continue
        if cluster.master_of(keys.registry(stream.stream_id)) == master:
            return stream
        stream.read_all() if "tokens=9999" not in prompt else _cancel(server, stream, client)
    raise AssertionError("no stream landed on the promoted master in time")


def _cancel(server: Sluice, stream: EventStream, client) -> None:
    wait_for(
        lambda: (
            request(server.base, "DELETE", f"{STREAM}/{stream.stream_id}", headers=client)[0] == 200
        ),
        20,
        "a cancel answered",
    )
    stream.read_all()


def test_a_master_dies_and_its_replica_takes_over_without_a_restart(pair, cluster, client, tag):
    a, b = pair
    pids = (a.proc.pid, b.proc.pid, sorted(a.worker_pids()), sorted(b.worker_pids()))
    live = EventStream(
        a.base, STREAM, {"prompt": "live sim:tokens=9999 sim:rate=30"}, headers=client
    )
    live.until("token")
    key = keys.registry(live.stream_id)
    dead = cluster.master_of(key)
    cluster.kill(dead)
    # until the promotion: starts answer, or fail as Redis unavailable (503), never 500
    for server in (a, b, a, b):
        status, _, body = request(
            server.base, "POST", "/api/v1/completions", {"prompt": "x sim:tokens=2"}, client
        )
        assert status == 202 or (status, body["error"]["code"]) == (503, "redis_unavailable")
    promoted = cluster.wait_failover(dead, key)
    deadline = time.monotonic() + 20  # API.md §13: within 20 s of the promotion
    # the stream that was running goes on, and a cancel from the other server stops it
    status = None
    while time.monotonic() < deadline:
        status, _, body = request(b.base, "DELETE", f"{STREAM}/{live.stream_id}", headers=fresh())
        if status == 200:
            break
    assert status == 200 and body["status"] in ("cancelled", "finished")
    assert live.read_all()[-1]["data"]["reason"] == "cancelled"
    # new streams on the promoted master: streamed, cancelled across servers, resumed
    stream = start_on(
        a, client, f"again sim:tokens=9999 sim:rate=30 sim:tag={tag}", promoted, cluster, deadline
    )
    stream.until("token")
    started = time.monotonic()
    status, _, body = request(b.base, "DELETE", f"{STREAM}/{stream.stream_id}", headers=client)
    assert (status, body["status"]) == (200, "cancelled")
    assert time.monotonic() - started < 1.0
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"
    short = start_on(b, client, "short sim:tokens=30 sim:rate=60", promoted, cluster, deadline)
    for _ in range(3):
        short.next_event()
    seen = list(short.events)
    short.close()
    rest = EventStream(
        a.base,
        f"{STREAM}/{short.stream_id}",
        method="GET",
        headers={**client, "Last-Event-ID": seen[-1]["id"]},
    ).read_all()
    events = seen + rest
    assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["data"]["reason"] == "stop"
    assert time.monotonic() < deadline
    print(f"failover: all worked again {time.monotonic() - (deadline - 20):.1f}s after promotion")
    wait_for(lambda: request(a.base, "GET", "/ready")[0] == 200, 5, "ready")
    assert pids == (a.proc.pid, b.proc.pid, sorted(a.worker_pids()), sorted(b.worker_pids()))
