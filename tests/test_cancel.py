"""DELETE /api/v1/completions/stream/<id>: cancel wherever the generation runs."""

from __future__ import annotations

import http.client
import json
import time

import pytest

from devtools.harness import wait_for
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATH = "/api/v1/completions/stream"


def owner_pid(redis_client, stream_id: str) -> int:
    worker = redis_client.hget(f"sluice:stream:{stream_id}", "worker").decode()
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
    redis_client.set(f"sluice:cancel:{stream.stream_id}", "1", ex=60)
    events = stream.read_all()
    assert events[-1]["data"]["reason"] == "cancelled"
    assert simulator.record(tag, timeout=1)["state"] == "client_closed"


def test_registry_entry_records_the_end(sluice, redis_client):
    stream = EventStream(sluice.base, PATH, {"prompt": "short sim:tokens=3"})
    stream.read_all()
    entry = redis_client.hgetall(f"sluice:stream:{stream.stream_id}")
    assert entry[b"state"] == b"finished" and entry[b"reason"] == b"stop"
    assert 0 < redis_client.ttl(f"sluice:stream:{stream.stream_id}") <= 300
