"""Rate limits, forwarded headers, concurrency slots (real gunicorn, 2 gevent workers)."""

from __future__ import annotations

import pytest

from devtools.harness import wait_for
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PATH = "/api/v1/completions/stream"
MISSING = f"{PATH}/st_{'0' * 32}"


@pytest.fixture(scope="module")
def limited(make_sluice):
    return make_sluice(workers=2, RATE_LIMIT_DEFAULT="6/minute", RATE_LIMIT_STREAM="2/minute")


def test_default_limit_is_shared_by_both_workers(limited, fresh_limits, sluice):
    statuses = []
    for _ in range(10):
        status, headers, body = request(limited.base, "GET", MISSING)
        statuses.append(status)
        if status == 429:
            assert body["error"]["code"] == "rate_limited"
            assert int(headers["retry-after"]) > 0
            assert headers["x-ratelimit-limit"] == "6"
            assert headers["content-type"] == "application/json"
        else:  # only refusals carry the window (it costs two Redis round trips)
            assert "x-ratelimit-limit" not in headers
    assert statuses == [404] * 6 + [429] * 4
    # the operations routes are never limited
    assert request(limited.base, "GET", "/health")[0] == 200
    assert request(limited.base, "GET", "/ready")[0] == 200


def test_stream_starts_have_their_own_limit(limited, fresh_limits):
    started = []
    for _ in range(2):
        stream = EventStream(limited.base, PATH, {"prompt": "x sim:tokens=2"})
        assert stream.status == 200
        started.append(stream.read_all()[-1]["data"]["reason"])
    assert started == ["stop", "stop"]
    status, headers, body = request(limited.base, "POST", PATH, {"prompt": "x"})
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert "retry-after" in headers
    # other routes still answer: the default budget is separate
    assert request(limited.base, "GET", MISSING)[0] == 404


def test_forged_forwarded_for_is_ignored_without_trusted_proxies(limited, fresh_limits):
    statuses = [
        request(limited.base, "GET", MISSING, headers={"X-Forwarded-For": f"10.0.0.{i}"})[0]
        for i in range(8)
    ]
    assert statuses == [404] * 6 + [429] * 2


def test_behind_one_proxy_the_forwarded_client_has_its_own_bucket(make_sluice, fresh_limits):
    server = make_sluice(workers=2, TRUSTED_PROXIES="1", RATE_LIMIT_DEFAULT="3/minute")
    alice = {"X-Forwarded-For": "203.0.113.7"}
    bob = {"X-Forwarded-For": "198.51.100.9"}
    assert [request(server.base, "GET", MISSING, headers=alice)[0] for _ in range(4)] == [
        404,
        404,
        404,
        429,
    ]
    assert request(server.base, "GET", MISSING, headers=bob)[0] == 404
    # a client may put anything in front: only the last hop (set by the proxy) is believed
    spoof = {"X-Forwarded-For": "198.51.100.9, 203.0.113.7"}
    assert request(server.base, "GET", MISSING, headers=spoof)[0] == 429


def test_requests_that_fail_authentication_count_too(make_sluice, fresh_limits):
    # flask-limiter counts a blueprint's default budget before the authentication hook
    # runs, so guessing keys is limited (a per-IP budget of auth failures is issue 18's)
    server = make_sluice(workers=2, API_KEYS="k1", RATE_LIMIT_DEFAULT="3/minute")
    wrong = {"Authorization": "Bearer nope"}
    statuses = [request(server.base, "GET", MISSING, headers=wrong)[0] for _ in range(3)]
    assert statuses == [401, 401, 401]
    status, headers, body = request(server.base, "GET", MISSING, headers=wrong)
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert int(headers["retry-after"]) > 0 and headers["x-ratelimit-limit"] == "3"


@pytest.fixture(scope="module")
def two_slots(make_sluice):
    return make_sluice(workers=2, MAX_CONCURRENT_STREAMS="2")


def slot_count(redis_client) -> int:
    return sum(redis_client.zcard(k) for k in redis_client.scan_iter("sluice:slots:*"))


LONG = "long sim:tokens=9999 sim:rate=20"


def test_slots_are_counted_across_workers_and_come_back(two_slots, fresh_limits, redis_client):
    a = EventStream(two_slots.base, PATH, {"prompt": LONG})
    b = EventStream(two_slots.base, PATH, {"prompt": LONG})
    a.until("token"), b.until("token")
    status, _, body = request(two_slots.base, "POST", PATH, {"prompt": "x"})
    assert (status, body["error"]["code"]) == (429, "too_many_streams")
    assert slot_count(redis_client) == 2

    # cancel frees one
    assert request(two_slots.base, "DELETE", f"{PATH}/{a.stream_id}")[2]["status"] == "cancelled"
    a.read_all()
    c = EventStream(two_slots.base, PATH, {"prompt": LONG})
    assert c.status == 200
    c.until("token")

    # a client that leaves frees one (grace 0 here)
    c.close()
    wait_for(lambda: slot_count(redis_client) == 1, 5, "slot released after disconnect")

    # an upstream error frees one
    d = EventStream(two_slots.base, PATH, {"prompt": "x sim:fail=500"})
    assert d.read_all()[-1]["data"]["reason"] == "error"
    assert slot_count(redis_client) == 1
    b.close()
    wait_for(lambda: slot_count(redis_client) == 0, 5, "all slots released")
