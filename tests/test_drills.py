"""Fault drills with real processes: Redis, upstream and worker failures hang nothing,
lose nothing, and release what they hold (see docs/RELIABILITY.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from devtools.harness import RedisServer, Sluice, free_port, wait_for
from streaming.core import keys
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.drill, pytest.mark.timeout(120)]

PATH = "/api/v1/completions/stream"
LONG = "drill sim:tokens=99999 sim:rate=20"


@pytest.fixture()
def own_redis():
    servers: list[RedisServer] = []

    def make(port: int | None = None) -> RedisServer:
        server = RedisServer(port).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        if server.proc and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


@pytest.fixture()
def own_sluice(simulator):
    servers: list[Sluice] = []

    def make(redis_url: str, workers: int = 2, **env: str) -> Sluice:
        server = Sluice(
            {
                "REDIS_URL": redis_url,
                "OPENAI_BASE_URL": simulator.v1,
                "OPENAI_API_KEY": "sk-test",
                "HEARTBEAT_SECONDS": "1",
                "DISCONNECT_GRACE_SECONDS": "0",
                "UPSTREAM_TIMEOUT_SECONDS": "5",
                "UPSTREAM_HEAD_TIMEOUT_SECONDS": "5",
                **env,
            },
            workers=workers,
        ).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def test_redis_down_at_startup_then_back_without_a_restart(own_redis, own_sluice, simulator, tag):
    port = free_port()
    server = own_sluice(f"redis://127.0.0.1:{port}/0")
    assert request(server.base, "GET", "/health")[0] == 200
    assert request(server.base, "GET", "/ready")[2]["error"]["code"] == "redis_unavailable"
    status, _, body = request(server.base, "POST", PATH, {"prompt": "x"})
    assert (status, body["error"]["code"]) == (503, "redis_unavailable")

    own_redis(port)
    wait_for(lambda: request(server.base, "GET", "/ready")[0] == 200, 10, "ready")

    def started():
        stream = EventStream(server.base, PATH, {"prompt": f"{LONG} sim:tag={tag}"})
        if stream.status == 200:
            return stream
        stream.json()  # a worker that has not yet seen Redis back may still fail fast
        return None

    stream = wait_for(started, 10, "a stream starts")
    stream.until("token")

    # the cancel listeners reconnected: a DELETE cancels, whichever worker takes it
    def deleted():
        status, _, body = request(server.base, "DELETE", f"{PATH}/{stream.stream_id}")
        if status == 503 and body["error"]["code"] == "redis_unavailable":
            return None  # that worker's RedisGate still cools down from its last failure
        return status

    for _ in range(3):
        assert wait_for(deleted, 10, "a DELETE answered") == 200
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"
    assert simulator.record(tag, timeout=2)["state"] == "client_closed"


def test_redis_restarted_mid_stream(own_redis, own_sluice, simulator, tag):
    redis_server = own_redis()
    server = own_sluice(redis_server.url)
    stream = EventStream(server.base, PATH, {"prompt": f"{LONG} sim:tag={tag}"})
    stream.until("token")
    redis_server.stop()  # no persistence: every key is lost
    before = len(stream.events)
    for _ in range(3):  # the stream goes on while Redis is away
        stream.until("token")
    assert len(stream.events) >= before + 3
    restarted = own_redis(redis_server.port)
    import redis

    client = redis.Redis.from_url(restarted.url)
    # the owning worker registers its live stream again within a tick
    wait_for(lambda: client.exists(keys.registry(stream.stream_id)), 10, "re-registered")
    status, _, body = request(server.base, "DELETE", f"{PATH}/{stream.stream_id}")
    assert (status, body["status"]) == (200, "cancelled")
    events = stream.read_all()
    assert events[-1]["data"]["reason"] == "cancelled"
    assert simulator.record(tag, timeout=2)["state"] == "client_closed"
    client.close()


def test_cancel_flag_covers_a_publish_lost_while_redis_was_away(own_redis, own_sluice, tag):
    redis_server = own_redis()
    server = own_sluice(redis_server.url, workers=1)
    stream = EventStream(server.base, PATH, {"prompt": f"{LONG} sim:tag={tag}"})
    stream.until("token")
    redis_server.stop()
    restarted = own_redis(redis_server.port)
    import redis

    client = redis.Redis.from_url(restarted.url)
    client.set(keys.cancel_flag(stream.stream_id), "1", ex=60)  # no PUBLISH reaches anyone
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"
    client.close()


def test_redis_frozen_hangs_nothing(own_redis, own_sluice, tag):
    redis_server = own_redis()
    server = own_sluice(redis_server.url)
    stream = EventStream(server.base, PATH, {"prompt": f"{LONG} sim:tag={tag}"})
    stream.until("token")
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        for method, path, body in [
            ("GET", "/ready", None),
            ("POST", PATH, {"prompt": "x"}),
            ("GET", "/ready", None),
            ("POST", PATH, {"prompt": "x"}),
        ]:
            started = time.monotonic()
            status, _, out = request(server.base, method, path, body)
            took = time.monotonic() - started
            assert (status, out["error"]["code"]) == (503, "redis_unavailable")
            # bounded by the 2 s socket timeout per call: the limiter's probes, then ours
            assert took < 7.5, (method, path, took)
        assert request(server.base, "GET", "/health")[0] == 200
        before = len(stream.events)
        stream.until("token")  # the live stream keeps flowing to its client
        assert len(stream.events) > before
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    wait_for(lambda: request(server.base, "GET", "/ready")[0] == 200, 10, "ready again")
    # a worker may fail fast for up to 2 s more (its gate), then answers again
    reply = wait_for(
        lambda: request(server.base, "DELETE", f"{PATH}/{stream.stream_id}")[2].get("status"),
        10,
        "cancel after the thaw",
    )
    assert reply == "cancelled"
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"


def test_upstream_failures_release_slots_and_sockets(sluice, simulator, redis_client, tag):
    faults = [
        "sim:fail=429 sim:retry_after=3",
        "sim:fail=500",
        "sim:hang=30",
        "sim:tokens=50 sim:stall_after=2 sim:stall=30",
        "sim:tokens=50 sim:close_after=3",
        "sim:tokens=50 sim:malformed_after=2",
    ]
    for i, fault in enumerate(faults):
        events = EventStream(
            sluice.base, PATH, {"prompt": f"x {fault} sim:tag={tag}-{i}"}
        ).read_all()
        assert [e["event"] for e in events][-2:] == ["error", "done"]
        assert simulator.record(f"{tag}-{i}", timeout=2)["state"] != "open"
        entry = redis_client.hgetall(keys.registry(events[0]["data"]["stream_id"]))
        assert entry[b"state"] == b"finished"
        slots = redis_client.zrange(keys.slots(entry[b"client"].decode()), 0, -1)
        assert events[0]["data"]["stream_id"].encode() not in slots


def test_worker_sigkill_mid_stream(make_sluice, redis_client, simulator, tag):
    server = make_sluice(workers=2)
    stream = EventStream(server.base, PATH, {"prompt": f"{LONG} sim:tag={tag}"})
    stream.until("token")
    entry = redis_client.hgetall(keys.registry(stream.stream_id))
    owner = int(entry[b"worker"].decode().split(":")[1])
    assert 0 < redis_client.ttl(keys.registry(stream.stream_id)) <= 20
    os.kill(owner, signal.SIGKILL)
    events = stream.read_all()  # the connection ends with the worker
    assert stream.broken and events[-1]["event"] != "done"
    assert simulator.record(tag, timeout=5)["state"] == "client_closed"  # kernel closed it
    started = time.monotonic()
    status, _, body = request(server.base, "DELETE", f"{PATH}/{stream.stream_id}")
    assert (status, body["status"]) == (200, "finished")
    assert time.monotonic() - started < 10
    client = entry[b"client"].decode()
    assert stream.stream_id.encode() not in redis_client.zrange(keys.slots(client), 0, -1)
    assert redis_client.hget(keys.registry(stream.stream_id), "state") == b"finished"


def test_a_client_that_stops_reading_is_dropped_and_delays_nobody(make_sluice, simulator, tag):
    server = make_sluice(workers=1, SEND_TIMEOUT_SECONDS="2")
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"prompt": f"flood sim:tokens=100000 sim:rate=0 sim:tag={tag}"}).encode()
    slow.sendall(
        b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    simulator.record(tag, wait="seen")
    # another stream on the same (only) worker is not held up by the stuck one
    started = time.monotonic()
    other = EventStream(server.base, PATH, {"prompt": "meanwhile sim:tokens=5"})
    events = other.read_all()
    assert events[-1]["data"]["reason"] == "stop"
    assert time.monotonic() - started < 5
    # the stuck client is dropped after the send timeout: the worker closes its socket
    assert simulator.record(tag, timeout=30)["state"] in ("client_closed", "completed")
    port = slow.getsockname()[1]
    wait_for(lambda: server.worker_of_connection(port) is None, 30, "the worker drops it")
    slow.close()


def test_slowloris_heads_do_not_take_a_worker_down(make_sluice):
    server = make_sluice(workers=1)
    loris = []
    for _ in range(50):
        conn = socket.create_connection(("127.0.0.1", server.port))
        conn.sendall(b"POST /api/v1/completions/stream HTTP/1.1\r\nHost: x\r\nX-a: ")
        loris.append(conn)
    try:
        events = EventStream(server.base, PATH, {"prompt": "still here sim:tokens=3"}).read_all()
        assert events[-1]["data"]["reason"] == "stop"
        assert request(server.base, "GET", "/health")[0] == 200
    finally:
        for conn in loris:
            conn.close()
