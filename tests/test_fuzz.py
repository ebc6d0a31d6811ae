"""Hostile input on every route: always a typed JSON answer, never a 500 or a hang."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROUTES = [
    ("POST", "/api/v1/completions/stream"),
    ("POST", "/api/v1/completions"),
    ("DELETE", "/api/v1/completions/stream/{id}"),
    ("GET", "/api/v1/completions/stream/{id}"),
]
ERROR_CODES = {
    "invalid_json",
    "invalid_request",
    "unsupported_media_type",
    "payload_too_large",
    "not_found",
    "method_not_allowed",
    "model_not_allowed",
    "unauthorized",
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "prompt": json_values,
            "messages": json_values,
            "model": json_values,
            "max_tokens": json_values,
            "temperature": json_values,
            "session_id": json_values,
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=2000),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=500).map(str.encode),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
)
ids = st.one_of(
    st.text(max_size=60),
    st.just("st_" + "a" * 32),
    st.text(alphabet="0123456789abcdefst_", min_size=30, max_size=40),
)
content_types = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "",
        "application/x-www-form-urlencoded",
    ]
)


@pytest.fixture(scope="module")
def conn(sluice):
    c = http.client.HTTPConnection("127.0.0.1", sluice.port, timeout=10)
    yield c
    c.close()


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(route=st.sampled_from(ROUTES), body=bodies, stream_id=ids, ctype=content_types)
def test_random_input_gets_a_typed_answer(conn, redis_client, route, body, stream_id, ctype):
    method, template = route
    from urllib.parse import quote

    path = template.format(id=quote(stream_id, safe=""))
    headers = {"Content-Type": ctype} if ctype else {}
    before = set(redis_client.scan_iter("sluice:stream:*"))
    conn.request(method, path, body=body if method == "POST" else None, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    assert resp.status < 500, (resp.status, data[:300])
    if resp.status >= 400:
        assert resp.getheader("Content-Type") == "application/json"
        error = json.loads(data)["error"]
        assert error["code"] in ERROR_CODES and error["message"]
        if method == "POST":
            assert set(redis_client.scan_iter("sluice:stream:*")) == before
    if resp.getheader("Connection") == "close":
        conn.close()
