"""Request bodies straight to gunicorn: malformed ones are a typed 400, stalled ones a 408.

Real gunicorn (2 gevent workers), raw sockets: what a client that bypasses
nginx can send. See streaming/web/body_deadline.py and docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from devtools.harness import wait_for
from streaming.web.body_deadline import BODY_SECONDS
from tests.sse_client import request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATH = "/api/v1/completions/stream"
HEAD = (
    f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    "Transfer-Encoding: chunked\r\n\r\n"
).encode()


@pytest.fixture(scope="module")
def server(make_sluice):
    return make_sluice(workers=2)


def exchange(port: int, raw: bytes, half_close: bool = False, timeout: float = 30.0):
    """Send `raw` on a new connection; (status, headers, body as JSON, seconds to the answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        started = time.monotonic()
        conn.sendall(raw)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        return read_response(conn, started)


def read_response(conn: socket.socket, started: float):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "connection closed mid-answer"
        body += chunk
    return status, headers, json.loads(body[:length]), time.monotonic() - started


MALFORMED = [
    ("size not hex", b"zz\r\n{}\r\n0\r\n\r\n"),
    ("size empty", b"\r\n{}\r\n0\r\n\r\n"),
    ("negative size", b"-2\r\n{}\r\n0\r\n\r\n"),
    ("bad chunk extension", b'2;="x\r\n{}\r\n0\r\n\r\n'),
    ("bare CR in extension", b"2;a=b\rc\r\n{}\r\n0\r\n\r\n"),
    ("no CRLF after the data", b'4\r\n{"a"XX0\r\n\r\n'),
    ("size line over 8 KiB", b"1" + b" " * 9000 + b"\r\n"),
    ("bare LF in trailers", b"2\r\n{}\r\n0\r\nX-A: b\nX-B: c\r\n\r\n"),
]


@pytest.mark.parametrize("raw", [m[1] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_a_malformed_chunked_body_is_a_typed_400(server, raw):
    status, headers, body, took = exchange(server.port, HEAD + raw)
    assert (status, body["error"]["code"]) == (400, "invalid_request"), body
    assert headers["content-type"] == "application/json"
    assert took < 5


def test_a_body_cut_short_is_a_typed_400(server):
    # the client half-closes its side mid-chunk: gunicorn's parser meets the end
    status, _, body, took = exchange(server.port, HEAD + b"10\r\n{}", half_close=True)
    assert (status, body["error"]["code"]) == (400, "invalid_request"), body
    assert took < 5


def test_a_well_formed_chunked_body_still_works(server):
    payload = json.dumps({"prompt": "hi sim:tokens=1"}).encode()
    raw = HEAD + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(raw)
        data = b""
        while b"event: done" not in data:
            chunk = conn.recv(65536)
            assert chunk, data
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")


STALLED = [
    ("content-length, half the body", b"Content-Length: 100\r\n\r\n" + b'{"prompt": "'),
    ("chunked, chunk cut short", b"Transfer-Encoding: chunked\r\n\r\n20\r\n{}"),
    (
        "chunked, 19-hex-digit chunk size",
        b"Transfer-Encoding: chunked\r\n\r\n" + b"F" * 19 + b"\r\n{}",
    ),
]


@pytest.mark.parametrize("rest", [s[1] for s in STALLED], ids=[s[0] for s in STALLED])
def test_a_stalled_body_is_a_typed_408_at_the_deadline(server, rest):
    head = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        started = time.monotonic()
        conn.sendall(head + rest)
        status, headers, body, took = read_response(conn, started)
        # and the connection closes: the rest of that body is not waited for
        conn.settimeout(3)
        assert conn.recv(1) == b""
    assert (status, body["error"]["code"]) == (408, "invalid_request"), body
    assert headers["content-type"] == "application/json"
    assert BODY_SECONDS - 0.5 <= took < BODY_SECONDS + 5, took


def test_health_answers_while_a_thousand_bodies_stall(server):
    stalled = []
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{"
    ).encode()
    try:
        started = time.monotonic()
        for _ in range(1000):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            conn.sendall(head)
            stalled.append(conn)
        opened = time.monotonic() - started
        # every request reached a worker (and waits on its body), then /health still answers
        health_started = time.monotonic()
        status, _, body = request(server.base, "GET", "/health", timeout=10)
        assert (status, body) == (200, {"status": "ok"})
        assert time.monotonic() - health_started < 2
        # and each stalled body gets its typed 408 once its deadline passed
        answers = [read_response(conn, started) for conn in stalled]
        assert {(a[0], a[2]["error"]["code"]) for a in answers} == {(408, "invalid_request")}
        slowest = max(a[3] for a in answers)
        assert slowest < BODY_SECONDS + opened + 10, (slowest, opened)
    finally:
        for conn in stalled:
            conn.close()
    wait_for(
        lambda: request(server.base, "GET", "/health", timeout=5)[0] == 200, 10, "/health after"
    )


def test_health_comes_back_within_a_deadline_when_stalled_bodies_fill_every_slot(make_sluice):
    # 2 workers x 100 connections, 250 stalled bodies: without a body deadline the
    # slots never free and /health waits forever; with it, each holds one <= 10 s
    server = make_sluice(workers=2, WORKER_CONNECTIONS="100")
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n{"
    ).encode()
    stalled = []
    try:
        for _ in range(250):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            conn.sendall(head)
            stalled.append(conn)
        started = time.monotonic()
        status, _, body = request(server.base, "GET", "/health", timeout=3 * BODY_SECONDS)
        took = time.monotonic() - started
        assert (status, body) == (200, {"status": "ok"})
        assert took < 2 * BODY_SECONDS + 5, took
    finally:
        for conn in stalled:
            conn.close()
