"""Usage and daily budgets over HTTP: real gunicorn (2 gevent workers), redis-server, simulator.

Open-mode servers here trust one proxy hop (``TRUSTED_PROXIES=1``), so each
test is its own client: its own ``X-Forwarded-For`` address, its own
counters. The counters are read from ``GET /api/v1/usage``; what they must
equal is read from the streams themselves: every stream's ``done`` event,
replayed through the native API (``GET /api/v1/completions/stream/<id>``),
whichever surface started it. The count lands in the generation's final
pipeline, just after its ``done`` event left, so a test waits (polling, with a
deadline) for ``generations`` to reach the number of streams, then compares.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import threading
from urllib.parse import urlsplit

import pytest

from devtools.harness import wait_for
from streaming.core import keys
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATH = "/api/v1/completions/stream"
V1 = "/v1/chat/completions"
USAGE = "/api/v1/usage"
BUDGET = 100_000
_ips = itertools.count(1)


@pytest.fixture(scope="module")
def budgeted(make_sluice):
    return make_sluice(TRUSTED_PROXIES="1", TOKEN_BUDGET_DAILY=str(BUDGET))


@pytest.fixture()
def client() -> dict[str, str]:
    """Headers that make this test a client of its own (open mode, one trusted hop)."""
    n = next(_ips)
    return {"X-Forwarded-For": f"10.19.{n // 250}.{n % 250 + 1}"}


def usage(server, headers) -> dict:
    status, _, body = request(server.base, "GET", USAGE, headers=headers)
    assert status == 200, body
    return body


def counted(server, headers, generations: int) -> dict:
    """The usage once `generations` generations are counted (never more)."""
    body = wait_for(
        lambda: (u := usage(server, headers))["generations"] >= generations and u,
        10,
        f"{generations} generations counted",
    )
    assert body["generations"] == generations, body
    return body


def done_of(server, stream_id: str, headers) -> dict:
    """The stream's one `done` event (its data), replayed or followed through the native API."""
    with EventStream(server.base, f"{PATH}/{stream_id}", method="GET", headers=headers) as s:
        assert s.status == 200, s.status
        events = s.read_all()
    dones = [e["data"] for e in events if e["event"] == "done"]
    assert len(dones) == 1 and events[-1]["event"] == "done", events
    return dones[0]


def v1(server, body: dict, headers) -> tuple[int, dict[str, str], bytes]:
    """One /v1 chat completion (streaming or not); status, lower-cased headers, raw body."""
    url = urlsplit(server.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    payload = {"model": "gpt-4o-mini", **body}
    conn.request(
        "POST",
        V1,
        body=json.dumps(payload),
        headers={"Content-Type": "application/json", **headers},
    )
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def stream(server, body: dict, headers) -> EventStream:
    s = EventStream(server.base, PATH, body, headers=headers)
    assert s.status == 200, s.json()
    return s


def usage_metrics(server) -> dict[tuple[str, str, str], float]:
    """sluice_usage_tokens_total by (surface, reason, kind), summed over the workers."""
    url = urlsplit(server.base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {}
    for labels, value in re.findall(r"^sluice_usage_tokens_total\{([^}]*)\} (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(got["surface"], got["reason"], got["kind"])] = float(value)
    return out


def totals(dones: list[dict]) -> tuple[int, int]:
    return (
        sum(d["usage"]["prompt_tokens"] for d in dones),
        sum(d["usage"]["completion_tokens"] for d in dones),
    )


def test_counters_are_the_sum_of_the_done_events_over_mixed_endings(budgeted, client, tag):
    before = usage_metrics(budgeted)
    ids: dict[str, str] = {}  # stream id -> surface
    for prompt, extra in [
        (f"ends sim:tokens=5 sim:tag={tag}-stop", {}),
        (f"cut off sim:tokens=10 sim:tag={tag}-len", {"max_tokens": 3}),
        (f"fails sim:fail=500 sim:tag={tag}-fail", {}),
        (f"breaks sim:tokens=50 sim:rate=0 sim:close_after=3 sim:tag={tag}-close", {}),
    ]:
        with stream(budgeted, {"prompt": prompt, **extra}, client) as s:
            s.read_all()
            ids[s.stream_id] = "api"
    with stream(
        budgeted, {"prompt": f"long sim:tokens=5000 sim:rate=50 sim:tag={tag}-c"}, client
    ) as s:
        s.until("token")
        status, _, body = request(budgeted.base, "DELETE", f"{PATH}/{s.stream_id}", headers=client)
        assert (status, body["status"]) == (200, "cancelled")
        s.read_all()
        ids[s.stream_id] = "api"
    status, _, body = request(
        budgeted.base, "POST", "/api/v1/completions", {"prompt": "detached sim:tokens=4"}, client
    )
    assert status == 202
    ids[body["stream_id"]] = "api"  # followed to its end by done_of below
    for payload in (
        {"stream": True, "stream_options": {"include_usage": True}},
        {"stream": False},
    ):
        messages = [{"role": "user", "content": f"openai sim:tokens=6 sim:tag={tag}-v1"}]
        status, headers, _ = v1(budgeted, {"messages": messages, **payload}, client)
        assert status == 200
        ids[headers["x-stream-id"]] = "v1"

    dones = {sid: done_of(budgeted, sid, client) for sid in ids}
    reasons = sorted(d["reason"] for d in dones.values())
    assert {"stop", "length", "cancelled", "error"} <= set(reasons), reasons
    assert any(d["usage"]["estimated"] for d in dones.values())  # estimates count too
    got = counted(budgeted, client, len(ids))
    prompt, completion = totals(list(dones.values()))
    assert (got["prompt_tokens"], got["completion_tokens"]) == (prompt, completion)
    assert got["budget"]["remaining"] == BUDGET - prompt - completion

    # Prometheus adds up the same tokens, by surface and reason (no owner label)
    after = usage_metrics(budgeted)
    for surface in ("api", "v1"):
        for kind in ("prompt", "completion"):
            delta = sum(
                v - before.get(k, 0) for k, v in after.items() if k[0::2] == (surface, kind)
            )
            want = sum(
                d["usage"][f"{kind}_tokens"] for sid, d in dones.items() if ids[sid] == surface
            )
            assert delta == want, (surface, kind)
    cancelled = [d for d in dones.values() if d["reason"] == "cancelled"][0]
    assert (
        after.get(("api", "cancelled", "completion"), 0) >= cancelled["usage"]["completion_tokens"]
    )


def test_two_owners_stay_apart(make_sluice):
    server = make_sluice(API_KEYS="k1,k2")
    one, two = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    start = {name: usage(server, h) for name, h in (("k1", one), ("k2", two))}
    dones = {"k1": [], "k2": []}
    for name, headers, prompt in [
        ("k1", one, "first sim:tokens=7"),
        ("k2", two, "second owner sim:tokens=3"),
        ("k1", one, "third sim:tokens=2"),
    ]:
        with stream(server, {"prompt": prompt}, headers) as s:
            s.read_all()
            dones[name].append(done_of(server, s.stream_id, headers))
    for name, headers in (("k1", one), ("k2", two)):
        got = counted(server, headers, start[name]["generations"] + len(dones[name]))
        prompt, completion = totals(dones[name])
        assert got["prompt_tokens"] - start[name]["prompt_tokens"] == prompt
        assert got["completion_tokens"] - start[name]["completion_tokens"] == completion
    assert request(server.base, "GET", USAGE)[0] == 401


def test_the_budget_refuses_starts_on_both_surfaces(budgeted, client, redis_client, simulator):
    day = usage(budgeted, client)["day"]
    ip = client["X-Forwarded-For"]
    redis_client.hset(keys.usage(ip, day), mapping={"prompt_tokens": BUDGET - 3})
    with stream(budgeted, {"prompt": "spend sim:tokens=50"}, client) as s:
        done = s.read_all()[-1]["data"]
    assert done["reason"] == "length" and done["usage"]["completion_tokens"] == 3  # what remained
    spent = counted(budgeted, client, 1)
    assert spent["prompt_tokens"] + spent["completion_tokens"] > BUDGET  # overshot by its prompt
    assert spent["budget"]["remaining"] == 0

    requests_before = simulator.stats()["requests"]
    refusals = [
        request(budgeted.base, "POST", PATH, {"prompt": "more"}, client),
        request(budgeted.base, "POST", "/api/v1/completions", {"prompt": "more"}, client),
    ]
    for status, headers, body in refusals:
        assert (status, body["error"]["code"]) == (429, "budget_exhausted")
        assert 1 <= int(headers["retry-after"]) <= 86400
    for payload in ({"stream": True}, {"stream": False}):
        messages = [{"role": "user", "content": "more"}]
        status, headers, raw = v1(budgeted, {"messages": messages, **payload}, client)
        error = json.loads(raw)["error"]
        assert (status, error["code"], error["type"]) == (
            429,
            "budget_exhausted",
            "rate_limit_error",
        )
        assert 1 <= int(headers["retry-after"]) <= 86400
    assert simulator.stats()["requests"] == requests_before  # nothing reached the upstream
    assert usage(budgeted, client)["generations"] == 1


def test_the_cap_reaches_the_upstream(budgeted, client, redis_client, simulator, tag):
    day = usage(budgeted, client)["day"]
    ip = client["X-Forwarded-For"]
    streams = itertools.count()

    def left(remaining: int) -> None:
        # the previous stream's count has landed (it would add to what we set here)
        counted(budgeted, client, next(streams))
        redis_client.hset(
            keys.usage(ip, day),
            mapping={"prompt_tokens": BUDGET - remaining, "completion_tokens": 0},
        )

    left(100)
    prompt = f"cap me sim:tokens=500 sim:rate=0 sim:tag={tag}-a"
    with stream(budgeted, {"prompt": prompt, "max_tokens": 1000}, client) as s:
        done = s.read_all()[-1]["data"]
    assert simulator.record(f"{tag}-a")["max_tokens"] == 100
    assert (done["reason"], done["usage"]["completion_tokens"]) == ("length", 100)

    left(100)
    prompt = f"no cap given sim:tokens=500 sim:rate=0 sim:tag={tag}-b"
    with stream(budgeted, {"prompt": prompt}, client) as s:
        s.read_all()
    assert simulator.record(f"{tag}-b")["max_tokens"] == 100

    left(100)
    prompt = f"a smaller cap stays sim:tokens=500 sim:rate=0 sim:tag={tag}-c"
    with stream(budgeted, {"prompt": prompt, "max_tokens": 5}, client) as s:
        s.read_all()
    assert simulator.record(f"{tag}-c")["max_tokens"] == 5

    for name, field in (("d", "max_completion_tokens"), ("e", "max_tokens")):
        left(80)
        content = f"openai cap sim:tokens=500 sim:rate=0 sim:tag={tag}-{name}"
        body = {"messages": [{"role": "user", "content": content}], field: 4000, "stream": True}
        status, _, _ = v1(budgeted, body, client)
        assert status == 200
        assert simulator.record(f"{tag}-{name}")["max_tokens"] == 80, field


def test_counters_survive_a_restart(make_sluice, client):
    first = make_sluice(TRUSTED_PROXIES="1")
    with stream(first, {"prompt": "before the restart sim:tokens=9"}, client) as s:
        s.read_all()
    before = counted(first, client, 1)
    first.stop()
    second = make_sluice(TRUSTED_PROXIES="1")
    assert usage(second, client) == before
    with stream(second, {"prompt": "after sim:tokens=2"}, client) as s:
        done = s.read_all()[-1]["data"]
    after = counted(second, client, 2)
    assert after["completion_tokens"] == before["completion_tokens"] + 2
    assert after["prompt_tokens"] == before["prompt_tokens"] + done["usage"]["prompt_tokens"]


def test_a_delete_racing_the_end_never_counts_twice(budgeted, client, redis_client):
    """Short streams, each DELETEd (from another connection, so either worker) the moment
    its `start` arrives: some end as cancelled, some end normally while the DELETE is in
    flight. Whichever wins, each stream is counted exactly once, as its `done` says."""
    n = 20
    ids, statuses = [], []
    for i in range(n):
        body = {"prompt": f"race {i} sim:tokens=3 sim:rate=0 sim:delay=0.0{i % 4}"}
        with stream(budgeted, body, client) as s:
            assert s.next_event()["event"] == "start"
            path = f"{PATH}/{s.stream_id}"
            result: list = []
            deleter = threading.Thread(
                target=lambda path=path, result=result: result.append(
                    request(budgeted.base, "DELETE", path, headers=client)
                )
            )
            deleter.start()
            s.read_all()
            deleter.join(10)
            assert not deleter.is_alive()
            status, _, answer = result[0]
            assert status == 200
            statuses.append(answer["status"])
            assert request(budgeted.base, "DELETE", path, headers=client)[2]["status"] == "finished"
            ids.append(s.stream_id)
    dones = [done_of(budgeted, sid, client) for sid in ids]
    got = counted(budgeted, client, n)
    assert (got["prompt_tokens"], got["completion_tokens"]) == totals(dones)
    for sid in ids:
        assert redis_client.get(keys.counted(client["X-Forwarded-For"], sid)) == b"1"
    # both outcomes happen in practice; the count is right either way
    assert set(statuses) <= {"cancelled", "finished"}
