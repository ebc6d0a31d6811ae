"""In-process: GET /api/v1/diagnostics/stream (API.md §12): frames, idle, limits, no credential.

The stream is real time (13 probes 250 ms apart): one test reads a whole one,
with a short silence; the others close the body unread (its `close()` runs
the cleanup even then).
"""

from __future__ import annotations

import json
import time

import pytest

from streaming.sse import parse
from streaming.web.diagnostics import PROBE_INTERVAL, PROBES, idle_schedule
from tests.app_tier import error_of

pytestmark = [pytest.mark.app, pytest.mark.timeout(30)]

PATH = "/api/v1/diagnostics/stream"


def test_probes_every_250_ms_then_pings_then_done(app_client):
    started = time.time()
    response = app_client.get(f"{PATH}?idle=0.6")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    text = b"".join(response.response).decode()  # iterates in real time (~3.6 s)
    response.close()
    events = parse(text)
    probes = [e for e in events if e["event"] == "probe"]
    assert [int(e["id"]) for e in events] == list(range(1, PROBES + 2))
    assert events[-1]["event"] == "done"
    data = [json.loads(e["data"]) for e in probes]
    assert [d["seq"] for d in data] == list(range(1, PROBES + 1))
    assert all(d["type"] == "probe" and d["of"] == PROBES for d in data)
    sent = [d["sent_at"] for d in data]
    assert started - 1 < sent[0] < started + 1
    # On a fixed schedule: never early; a probe a loaded box sent late does not push
    # the later ones (the next is due at its own time), so there is no drift.
    origin = min(s - k * PROBE_INTERVAL for k, s in enumerate(sent))
    late = [s - (origin + k * PROBE_INTERVAL) for k, s in enumerate(sent)]
    assert sum(lag < 0.1 for lag in late) > PROBES // 2, late
    assert 2.9 < sent[-1] - origin < 3.5, late
    assert data[0]["server"] == {"protocol": "HTTP/1.1", "forwarded": 0}
    assert data[0]["ping_interval"] == 0.2 and data[0]["idle"] == 0.6
    # the silence: pings only (two of them: 3 intervals of 0.2 s), then done
    tail = text.split("id: 13\n", 1)[1].split("\n\n", 1)[1]
    assert tail.startswith(": ping\n\n: ping\n\nid: 14\nevent: done\n"), tail
    done = json.loads(events[-1]["data"])
    assert done == {
        "type": "done",
        "finished": True,
        "probes": PROBES,
        "pings": 2,
        "idle": 0.6,
        "sent_at": done["sent_at"],
    }
    assert 0.55 < done["sent_at"] - sent[-1] < 0.9


@pytest.mark.parametrize(
    "idle",
    ["-1", "121", "120.5", "abc", "", "1e2", "nan", "inf", "0x10", "1.2345", " 5", "5 "],
)
def test_a_bad_idle_is_a_400_naming_it(app_client, idle):
    response = app_client.get(PATH, query_string={"idle": idle})
    assert error_of(response) == (400, "invalid_request")
    assert "'idle'" in response.get_json()["error"]["message"]


@pytest.mark.parametrize("idle", ["0", "120", "120.0", "2.5", "0.25"])
def test_idle_from_0_to_120_is_accepted(app_client, idle):
    response = app_client.get(PATH, query_string={"idle": idle})
    assert response.status_code == 200
    response.close()  # unread: the body's close() still runs


def test_the_idle_schedule():
    assert idle_schedule(0, 15) == (0, 0.0)
    assert idle_schedule(2, 15) == (2, 2 / 3)  # at least two pings cross any silence
    assert idle_schedule(45, 15) == (2, 15.0)  # >= 3 heartbeats: exactly the heartbeat
    assert idle_schedule(120, 15) == (7, 15.0)
    assert idle_schedule(12, 4) == (2, 4.0)
    assert idle_schedule(100, 15) == (6, 100 / 7)  # never longer than the heartbeat


def test_no_credential_needed_in_authenticated_mode(make_app):
    client = make_app(API_KEYS="key-one").test_client()
    assert error_of(client.get("/api/v1/usage")) == (401, "unauthorized")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer key-one"}):
        response = client.get(PATH, headers=headers)
        assert response.status_code == 200, headers
        assert response.mimetype == "text/event-stream"
        response.close()


def test_rate_limited_per_client_ip(make_app):
    client = make_app(RATE_LIMIT_DEFAULT="3/minute", API_KEYS="key-one").test_client()
    for _ in range(3):
        response = client.get(PATH)
        assert response.status_code == 200
        response.close()
    refused = client.get(PATH)
    assert error_of(refused) == (429, "rate_limited")
    assert int(refused.headers["Retry-After"]) > 0
    # another client IP has its own budget
    other = client.get(PATH, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert other.status_code == 200
    other.close()


def test_the_page_loads_its_arrival_check(app_client):
    response = app_client.get("/")
    page = response.get_data(as_text=True)
    response.close()
    assert '<script src="/static/arrival.js"></script>' in page
    script = app_client.get("/static/arrival.js")
    assert script.status_code == 200
    assert script.mimetype == "text/javascript"
    assert b"window.sluiceArrival" in script.data
    script.close()
