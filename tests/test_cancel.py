"""DELETE /api/v1/completions/stream/<id>: cancel wherever the generation runs."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import psutil
import pytest

from devtools.harness import wait_for
from streaming.core import keys
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATH = "/api/v1/completions/stream"


def owner_pid(redis_client, stream_id: str) -> int:
    worker = redis_client.hget(keys.registry(stream_id), "worker").decode()
    return int(worker.split(":")[1])


def delete_from(sluice, stream_id: str, *, other_than: int | None = None, on: int | None = None):
    """DELETE over a connection that a chosen worker accepted; returns (status, body, secs, pid)."""
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", sluice.port, timeout=10)
        conn.connect()
        port = conn.sock.getsockname()[1]
        pid = wait_for(lambda port=port: sluice.worker_of_connection(port), 5, "accept")
        if (other_than is None or pid != other_than) and (on is None or pid == on):
            started = time.monotonic()
            conn.request("DELETE", f"{PATH}/{stream_id}")
            resp = conn.getresponse()
            body = json.loads(resp.read())
            elapsed = time.monotonic() - started
            conn.close()
            return resp.status, body, elapsed, pid
        conn.close()
    raise AssertionError("no connection reached the wanted worker")


def start_stream(sluice, tag: str) -> EventStream:
    stream = EventStream(
        sluice.base, PATH, {"prompt": f"long sim:tokens=5000 sim:rate=30 sim:tag={tag}"}
    )
    assert stream.next_event()["event"] == "start"
    stream.until("token")
    return stream


def test_delete_on_the_other_worker_cancels_every_time(sluice, simulator, redis_client, tag):
    for attempt in range(15):
        stream = start_stream(sluice, f"{tag}-{attempt}")
        owner = owner_pid(redis_client, stream.stream_id)
        status, body, elapsed, pid = delete_from(sluice, stream.stream_id, other_than=owner)
        assert pid != owner
        assert status == 200 and body == {"stream_id": stream.stream_id, "status": "cancelled"}
        assert elapsed < 1.0, elapsed
        # the upstream request was really closed before DELETE answered
        record = simulator.record(f"{tag}-{attempt}", timeout=0.5)
        assert record["state"] == "client_closed", record
        events = stream.read_all()
        assert [e["event"] for e in events].count("done") == 1
        assert events[-1]["event"] == "done"
        assert events[-1]["data"]["reason"] == "cancelled"


def test_delete_on_the_same_worker_cancels(sluice, simulator, redis_client, tag):
    stream = start_stream(sluice, tag)
    owner = owner_pid(redis_client, stream.stream_id)
    status, body, elapsed, _ = delete_from(sluice, stream.stream_id, on=owner)
    assert (status, body["status"]) == (200, "cancelled") and elapsed < 1.0
    assert simulator.record(tag, timeout=0.5)["state"] == "client_closed"
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"


def test_delete_while_waiting_for_the_first_token(sluice, simulator, tag):
    stream = EventStream(sluice.base, PATH, {"prompt": f"x sim:delay=30 sim:tag={tag}"})
    assert stream.next_event()["event"] == "start"
    simulator.record(tag, wait="seen")
    status, _, body = request(sluice.base, "DELETE", f"{PATH}/{stream.stream_id}")
    assert (status, body["status"]) == (200, "cancelled")
    assert simulator.record(tag, timeout=0.5)["state"] == "client_closed"
    events = stream.read_all()
    assert [e["event"] for e in events] == ["start", "done"]
    assert events[-1]["data"]["reason"] == "cancelled"


def test_delete_is_idempotent_and_finished_streams_say_finished(sluice):
    stream = start_stream(sluice, "idem")
    path = f"{PATH}/{stream.stream_id}"
    assert request(sluice.base, "DELETE", path)[2]["status"] == "cancelled"
    assert request(sluice.base, "DELETE", path)[2] == {
        "stream_id": stream.stream_id,
        "status": "finished",
    }
    stream.close()
    done = EventStream(sluice.base, PATH, {"prompt": "short sim:tokens=2"})
    done.read_all()
    status, _, body = request(sluice.base, "DELETE", f"{PATH}/{done.stream_id}")
    assert (status, body["status"]) == (200, "finished")


@pytest.mark.parametrize(
    "stream_id", ["st_" + "0" * 32, "nope", "st_" + "G" * 32, "st_..%2F..", "st_" + "a" * 33]
)
def test_delete_unknown_or_malformed_is_404(sluice, stream_id):
    status, headers, body = request(sluice.base, "DELETE", f"{PATH}/{stream_id}")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert headers["content-type"] == "application/json"


def test_cancel_flag_alone_stops_a_stream_when_pubsub_lost_the_message(
    sluice, simulator, redis_client, tag
):
    stream = start_stream(sluice, tag)
    # no PUBLISH: only the flag, as after a listener reconnect that missed the message
    redis_client.set(keys.cancel_flag(stream.stream_id), "1", ex=60)
    events = stream.read_all()
    assert events[-1]["data"]["reason"] == "cancelled"
    assert simulator.record(tag, timeout=1)["state"] == "client_closed"


def test_registry_entry_records_the_end(sluice, redis_client):
    stream = EventStream(sluice.base, PATH, {"prompt": "short sim:tokens=3"})
    stream.read_all()
    entry = redis_client.hgetall(keys.registry(stream.stream_id))
    assert entry[b"state"] == b"finished" and entry[b"reason"] == b"stop"
    assert 0 < redis_client.ttl(keys.registry(stream.stream_id)) <= 300


def blocked_clients(redis_client, pids: list[int]) -> list[str]:
    """Redis clients of these processes blocked in a command (BLPOP, XREAD BLOCK, ...)."""
    redis_port = redis_client.connection_pool.connection_kwargs["port"]
    ports = {
        conn.laddr.port
        for pid in pids
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.raddr and conn.raddr.port == redis_port
    }
    return [
        c["cmd"]
        for c in redis_client.client_list()
        if int(c["addr"].rsplit(":", 1)[1]) in ports and "b" in c["flags"]
    ]


@pytest.mark.timeout(90)
def test_waiting_deletes_hold_no_redis_connection(make_sluice, redis_client, tag):
    """Regression (issue 14): each DELETE waited for its acknowledgement in a BLPOP, holding
    a pooled connection; now they wait on the worker's one listener."""
    a, b = make_sluice(workers=1), make_sluice(workers=2)
    stream = start_stream(a, tag)
    owner = owner_pid(redis_client, stream.stream_id)
    path = f"{PATH}/{stream.stream_id}"
    os.kill(owner, signal.SIGSTOP)  # the owner can acknowledge nothing now
    try:
        results: list = []
        threads = [
            threading.Thread(target=lambda: results.append(request(b.base, "DELETE", path)))
            for _ in range(50)
        ]
        for thread in threads:
            thread.start()
        samples = []

        def answered() -> bool:
            # while they wait (until the stopped owner's liveness key expires), none of
            # B's connections is blocked in Redis
            samples.append(blocked_clients(redis_client, b.worker_pids()))
            return len(results) == 50

        wait_for(answered, 30, "every DELETE answered")
        assert len(samples) > 10 and not any(samples), samples
        # the owner stopped ticking: its stream was buried, and every DELETE says so
        assert [(status, body["status"]) for status, _, body in results] == [(200, "finished")] * 50
    finally:
        os.kill(owner, signal.SIGCONT)
        stream.close()
