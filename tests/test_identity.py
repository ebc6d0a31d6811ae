"""Through gunicorn (2 gevent workers): sign-in revocation across workers, the retry line,
JWTs from a JWKS fetched inside a gevent worker, per-owner slots and usage (§2, §6)."""

from __future__ import annotations

import hashlib
import http.client
import json

import pytest

from devtools.harness import wait_for
from streaming.core import keys
from tests.jwks_server import AUDIENCE, ISSUER, JwksServer, Signer
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

PATH = "/api/v1/completions/stream"
AUTH = "/api/v1/auth/session"
K1 = {"Authorization": "Bearer key-one"}
K2 = {"Authorization": "Bearer key-two"}


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer("RS256", "rsa-1")


@pytest.fixture(scope="module")
def jwks(signer):
    with JwksServer(signer) as server:
        yield server


@pytest.fixture(scope="module")
def authed(make_sluice, jwks):
    return make_sluice(
        workers=2,
        API_KEYS="key-one,key-two",
        JWT_JWKS_URL=jwks.url,
        JWT_ISSUER=ISSUER,
        JWT_AUDIENCE=AUDIENCE,
        MAX_CONCURRENT_STREAMS="1",
    )


def connections_on_both_workers(server) -> tuple[http.client.HTTPConnection, ...]:
    """Two keep-alive connections, accepted by two different workers."""
    by_worker: dict[int, http.client.HTTPConnection] = {}
    for _ in range(200):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        conn.connect()
        port = conn.sock.getsockname()[1]
        pid = wait_for(lambda port=port: server.worker_of_connection(port), 5, "accept")
        if pid in by_worker:
            conn.close()
            continue
        by_worker[pid] = conn
        if len(by_worker) == 2:
            return tuple(by_worker.values())
    raise AssertionError("the connections never reached both workers")


def call(conn, method: str, path: str, headers: dict) -> tuple[int, dict, bytes]:
    conn.request(method, path, headers=headers)
    resp = conn.getresponse()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()


def test_sign_out_on_one_worker_revokes_on_the_other_at_once(authed):
    a, b = connections_on_both_workers(authed)
    status, headers, _ = call(a, "POST", AUTH, K1)
    assert status == 204
    cookie = {"Cookie": headers["set-cookie"].split(";")[0]}
    origin = {"Origin": authed.base}
    assert call(b, "GET", AUTH, cookie)[0] == 200
    assert call(b, "GET", "/api/v1/sessions", cookie)[0] == 200
    assert call(a, "DELETE", AUTH, {**cookie, **origin})[0] == 204
    # the very next request, on the other worker: refused
    status, _, body = call(b, "GET", AUTH, cookie)
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    assert call(b, "GET", "/api/v1/sessions", cookie)[0] == 401
    assert call(b, "POST", "/api/v1/sessions", {**cookie, **origin})[0] == 401
    assert cookie["Cookie"].split("=", 1)[1] not in authed.log_path.read_text()
    a.close()
    b.close()


def test_api_streams_begin_with_retry_and_v1_streams_do_not(authed):
    stream = EventStream(authed.base, PATH, {"prompt": "hi sim:tokens=3"}, headers=K1)
    events = stream.read_all()
    assert stream.text.startswith("retry: 1000\n\nid: 1\nevent: start\n")
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    # attach (replay of a finished stream) and a detached start followed live
    replay = EventStream(authed.base, f"{PATH}/{stream.stream_id}", method="GET", headers=K1)
    assert [e["id"] for e in replay.read_all()] == [e["id"] for e in events]
    assert replay.text.startswith("retry: 1000\n\nid: 1\n")
    status, _, started = request(
        authed.base, "POST", "/api/v1/completions", {"prompt": "x sim:tokens=3"}, headers=K1
    )
    assert status == 202
    live = EventStream(authed.base, started["stream_url"], method="GET", headers=K1)
    assert live.read_all()[-1]["event"] == "done"
    assert live.text.startswith("retry: 1000\n\n")
    # the OpenAI surface keeps OpenAI's format
    v1 = EventStream(
        authed.base,
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        headers=K1,
    )
    text = v1.resp.read().decode()
    v1.close()
    assert text.startswith("data: {") and text.rstrip().endswith("data: [DONE]")
    assert "retry:" not in text


def test_a_jwks_token_streams_and_owns(authed, signer, jwks):
    token = {"Authorization": f"Bearer {signer.token(sub='carol')}"}
    stream = EventStream(
        authed.base, PATH, {"prompt": "x sim:tokens=9999 sim:rate=20"}, headers=token
    )
    assert stream.status == 200
    stream.until("token")
    mine = f"{PATH}/{stream.stream_id}"
    assert request(authed.base, "DELETE", mine, headers=K1)[0] == 404  # another owner
    assert request(authed.base, "DELETE", mine, headers=token)[2]["status"] == "cancelled"
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"
    assert jwks.fetches <= 2  # once per worker at most, then the cache
    wrong = {"Authorization": f"Bearer {signer.token(aud='someone-else')}"}
    assert request(authed.base, "POST", PATH, {"prompt": "x"}, headers=wrong)[0] == 401
    # no credential reaches the logs: neither tokens nor keys
    log = authed.log_path.read_text()
    for secret in (token["Authorization"][7:], wrong["Authorization"][7:], "key-one"):
        assert secret not in log


def test_slots_and_usage_count_per_owner_behind_one_ip(authed):
    """MAX_CONCURRENT_STREAMS=1: each key has its own slot, though both come from 127.0.0.1."""
    before = request(authed.base, "GET", "/api/v1/usage", headers=K2)[2]["generations"]
    first = EventStream(authed.base, PATH, {"prompt": "x sim:tokens=9999 sim:rate=20"}, headers=K1)
    first.until("token")
    status, _, body = request(authed.base, "POST", PATH, {"prompt": "y"}, headers=K1)
    assert (status, body["error"]["code"]) == (429, "too_many_streams")
    other = EventStream(authed.base, PATH, {"prompt": "z sim:tokens=2"}, headers=K2)
    assert other.status == 200 and other.read_all()[-1]["data"]["reason"] == "stop"
    request(authed.base, "DELETE", f"{PATH}/{first.stream_id}", headers=K1)
    assert first.read_all()[-1]["data"]["reason"] == "cancelled"
    # usage: the finished generation is key-two's (counted in the final pipeline, once)
    after = wait_for(
        lambda: request(authed.base, "GET", "/api/v1/usage", headers=K2)[2]["generations"] > before,
        10,
        "key-two's usage",
    )
    assert after


def test_budgets_count_per_owner_behind_one_ip(make_sluice, redis_client):
    server = make_sluice(workers=2, API_KEYS="budget-one,budget-two", TOKEN_BUDGET_DAILY="1000")
    one, two = ({"Authorization": f"Bearer budget-{n}"} for n in ("one", "two"))
    day = request(server.base, "GET", "/api/v1/usage", headers=one)[2]["day"]
    owner = "key:" + hashlib.sha256(b"budget-one").hexdigest()[:24]  # as tokens.py names it
    redis_client.hset(keys.usage(owner, day), mapping={"prompt_tokens": 1000})
    status, _, body = request(server.base, "POST", PATH, {"prompt": "x"}, headers=one)
    assert (status, body["error"]["code"]) == (429, "budget_exhausted")
    assert request(server.base, "GET", "/api/v1/usage", headers=one)[2]["budget"]["remaining"] == 0
    other = EventStream(server.base, PATH, {"prompt": "y sim:tokens=2"}, headers=two)
    assert other.status == 200 and other.read_all()[-1]["data"]["reason"] == "stop"
