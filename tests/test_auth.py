"""Authenticated mode: bearer keys, ownership that cannot be told apart from absence."""

from __future__ import annotations

import pytest

from streaming.core import keys
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PATH = "/api/v1/completions/stream"
K1 = {"Authorization": "Bearer key-one"}
K2 = {"Authorization": "Bearer key-two"}


@pytest.fixture(scope="module")
def authed(make_sluice):
    return make_sluice(workers=2, API_KEYS="key-one,key-two")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "key-one"},
        {"Authorization": "Basic a2V5LW9uZQ=="},
        {"Authorization": "Bearer "},
    ],
    ids=["none", "wrong", "no-scheme", "basic", "empty"],
)
def test_without_a_valid_key_401(authed, headers):
    for method, path, body in [
        ("POST", PATH, {"prompt": "x"}),
        ("GET", f"{PATH}/st_{'0' * 32}", None),
        ("DELETE", f"{PATH}/st_{'0' * 32}", None),
    ]:
        status, hdrs, out = request(authed.base, method, path, body, headers=headers)
        assert (status, out["error"]["code"]) == (401, "unauthorized")
        assert hdrs["www-authenticate"] == "Bearer"
    assert request(authed.base, "GET", "/health")[0] == 200


def test_streams_belong_to_their_key(authed, redis_client):
    stream = EventStream(authed.base, PATH, {"prompt": "x sim:tokens=9999 sim:rate=20"}, headers=K1)
    stream.until("token")
    mine = f"{PATH}/{stream.stream_id}"
    unknown = f"{PATH}/st_{'0' * 32}"
    for method in ("DELETE", "GET"):
        other = request(authed.base, method, mine, headers=K2)
        missing = request(authed.base, method, unknown, headers=K2)
        assert other[0] == missing[0] == 404
        assert other[2] == missing[2]
    assert request(authed.base, "DELETE", mine, headers=K1)[2]["status"] == "cancelled"
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"
    # the key itself is never stored
    owner = redis_client.hget(keys.registry(stream.stream_id), "owner").decode()
    assert "key-one" not in owner and owner.startswith("key:")


def test_keys_never_reach_the_logs(authed):
    request(authed.base, "POST", PATH, {"prompt": "x"}, headers={"Authorization": "Bearer s3cr3t"})
    EventStream(authed.base, PATH, {"prompt": "x sim:tokens=2"}, headers=K1).read_all()
    log = authed.log_path.read_text()
    assert "s3cr3t" not in log and "key-one" not in log
