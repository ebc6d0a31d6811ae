"""Bad input gets the typed JSON error of the API, never a 500, and nothing is stored."""

from __future__ import annotations

import json
import socket

import pytest

from devtools.harness import free_port, wait_for
from tests.sse_client import request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PATH = "/api/v1/completions/stream"


def stream_keys(redis_client) -> set[bytes]:
    return set(redis_client.scan_iter("sluice:stream:*"))


CASES = [
    ("not json", b"{nope", "application/json", 400, "invalid_json"),
    ("bad utf-8", b'{"prompt": "\xff"}', "application/json", 400, "invalid_json"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "invalid_json"),
    ("text/plain", b'{"prompt": "hi"}', "text/plain", 415, "unsupported_media_type"),
    ("no content type", b'{"prompt": "hi"}', None, 415, "unsupported_media_type"),
    ("array body", b"[1, 2]", "application/json", 400, "invalid_request"),
    ("neither prompt nor messages", b"{}", "application/json", 400, "invalid_request"),
    (
        "both",
        b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}',
        "application/json",
        400,
        "invalid_request",
    ),
    ("prompt not a string", b'{"prompt": 5}', "application/json", 400, "invalid_request"),
    ("empty prompt", b'{"prompt": "  "}', "application/json", 400, "invalid_request"),
    (
        "bad role",
        b'{"messages": [{"role": "god", "content": "b"}]}',
        "application/json",
        400,
        "invalid_request",
    ),
    (
        "content not a string",
        b'{"messages": [{"role": "user", "content": {"a": 1}}]}',
        "application/json",
        400,
        "invalid_request",
    ),
    ("empty messages", b'{"messages": []}', "application/json", 400, "invalid_request"),
    (
        "max_tokens a string",
        b'{"prompt": "a", "max_tokens": "5"}',
        "application/json",
        400,
        "invalid_request",
    ),
    (
        "max_tokens zero",
        b'{"prompt": "a", "max_tokens": 0}',
        "application/json",
        400,
        "invalid_request",
    ),
    (
        "temperature too high",
        b'{"prompt": "a", "temperature": 3}',
        "application/json",
        400,
        "invalid_request",
    ),
    (
        "session_id not a string",
        b'{"prompt": "a", "session_id": 1}',
        "application/json",
        400,
        "invalid_request",
    ),
    (
        "model not allowed",
        b'{"prompt": "a", "model": "gpt-5-ultra"}',
        "application/json",
        400,
        "model_not_allowed",
    ),
    (
        "prompt too long",
        b'{"prompt": "' + b"a" * 32_001 + b'"}',
        "application/json",
        400,
        "invalid_request",
    ),
    (
        "body too large",
        b'{"prompt": "' + b"a" * 300_000 + b'"}',
        "application/json",
        413,
        "payload_too_large",
    ),
]


@pytest.mark.parametrize(
    ("name", "raw", "ctype", "status", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_typed_error(sluice, redis_client, name, raw, ctype, status, code):
    before = stream_keys(redis_client)
    headers = {"Content-Type": ctype} if ctype else {}
    got, hdrs, body = request(sluice.base, "POST", PATH, raw=raw, headers=headers)
    assert (got, body["error"]["code"]) == (status, code), body
    assert hdrs["content-type"] == "application/json"
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert stream_keys(redis_client) == before


def test_field_errors_name_the_field(sluice):
    _, _, body = request(sluice.base, "POST", PATH, {"prompt": "a", "temperature": "hot"})
    assert "temperature" in body["error"]["message"]
    _, _, body = request(sluice.base, "POST", PATH, {"messages": [{"role": "user"}]})
    assert "messages.0.content" in body["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nowhere", 404, "not_found"),
        ("PUT", PATH, 405, "method_not_allowed"),
        ("GET", PATH, 405, "method_not_allowed"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("GET", f"{PATH}/st_{'0' * 32}", 404, "not_found"),
        ("GET", f"{PATH}/garbage", 404, "not_found"),
    ],
)
def test_routes_answer_json_errors(sluice, method, path, status, code):
    got, headers, body = request(sluice.base, method, path)
    assert (got, body["error"]["code"]) == (status, code)
    assert headers["content-type"] == "application/json"


def test_health_and_ready(sluice):
    assert request(sluice.base, "GET", "/health")[::2] == (200, {"status": "ok"})
    assert request(sluice.base, "GET", "/ready")[0] == 200


def test_redis_unreachable_is_503_and_health_stays_up(make_sluice):
    server = make_sluice(workers=1, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert request(server.base, "GET", "/health")[::2] == (200, {"status": "ok"})
    status, _, body = request(server.base, "GET", "/ready")
    assert (status, body["error"]["code"]) == (503, "redis_unavailable")
    status, _, body = request(server.base, "POST", PATH, {"prompt": "hi"})
    assert (status, body["error"]["code"]) == (503, "redis_unavailable")
    status, _, body = request(server.base, "DELETE", f"{PATH}/st_{'1' * 32}")
    assert (status, body["error"]["code"]) == (503, "redis_unavailable")


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Range": "bytes=99999999-"}, 416),  # was 416 internal_error
        ({"If-Match": '"not-the-page"'}, 412),  # was 412 with the whole page as its body
    ],
    ids=["range not satisfiable", "if-match fails"],
)
def test_unmapped_4xx_on_the_page_is_a_typed_invalid_request(sluice, headers, status):
    got, hdrs, body = request(sluice.base, "GET", "/", headers=headers)
    assert (got, body["error"]["code"]) == (status, "invalid_request"), body
    assert hdrs["content-type"] == "application/json"
    assert "<html" not in json.dumps(body).lower()


def test_a_client_dropped_by_the_send_timeout_logs_one_line(make_sluice, simulator, tag):
    server = make_sluice(workers=1, SEND_TIMEOUT_SECONDS="1")
    offset = server.log_path.stat().st_size
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = json.dumps({"prompt": f"flood sim:tokens=100000 sim:rate=0 sim:tag={tag}"}).encode()
    slow.sendall(
        b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: "
        b"application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    try:

        def logged() -> str:
            with open(server.log_path, "rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
            return text if "client dropped" in text else ""

        text = wait_for(logged, 30, "the drop to be logged")
    finally:
        slow.close()
    assert "Traceback" not in text
    assert "Socket error processing request" not in text
    [line] = [line for line in text.splitlines() if "client dropped" in line]
    assert "timed out" in line
