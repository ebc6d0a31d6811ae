"""The repository's nginx.conf in front of a real gunicorn (2 gevent workers).

nginx runs in the foreground from a temporary prefix (its own pid file, logs
and temp paths), with nginx.conf rendered onto free ports and included in a
minimal main config, exactly as a site file is included in http {}. CI
installs nginx (`apt-get install -y nginx`); without it these tests fail.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devtools.harness import ROOT, Sluice, free_port, wait_for
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.nginx, pytest.mark.timeout(90)]

PATH = "/api/v1/completions/stream"
MISSING = f"{PATH}/st_{'0' * 32}"
OTHER_CLIENT = "127.0.0.2"  # another loopback address: a second client machine

MAIN_CONF = """\
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{}}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/sluice.conf;
}}
"""


def nginx_binary() -> str:
    found = os.environ.get("NGINX") or shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.access(found, os.X_OK):
        pytest.fail(
            f"nginx is not installed (no {found}): these tests run the real nginx.conf; "
            "install it with `apt-get install -y nginx` (CI does)",
            pytrace=False,
        )
    return found


def render_site(listen_port: int, upstream_port: int) -> str:
    """nginx.conf with its listen port and gunicorn address moved, by plain replacement."""
    text = (ROOT / "nginx.conf").read_text()
    for old, new in (
        ("listen 80;", f"listen 127.0.0.1:{listen_port};"),
        ("127.0.0.1:8000", f"127.0.0.1:{upstream_port}"),
    ):
        assert text.count(old) == 1, f"nginx.conf should contain {old!r} exactly once"
        text = text.replace(old, new)
    return text


class Nginx:
    def __init__(self, upstream_port: int, edit: Callable[[str], str] | None = None):
        self.upstream_port = upstream_port
        self.edit = edit  # a variant of the site (tests/test_doctor.py), else nginx.conf itself
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # not under pytest's 0700 tmp dirs: nginx's workers run as nobody when we are root
        self.dir = Path(tempfile.mkdtemp(prefix="sluice-nginx-"))
        self.dir.chmod(0o755)
        self.proc: subprocess.Popen | None = None

    def start(self, ready_status: int = 200) -> Nginx:
        """Start nginx; ready when GET /health through it answers `ready_status`."""
        binary = nginx_binary()
        site = render_site(self.port, self.upstream_port)
        (self.dir / "sluice.conf").write_text(self.edit(site) if self.edit else site)
        conf = self.dir / "nginx.conf"
        conf.write_text(MAIN_CONF.format(tmp=self.dir))
        args = [binary, "-c", str(conf), "-p", f"{self.dir}/"]
        version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr
        found = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", version)
        if found and tuple(map(int, found.groups())) >= (1, 19, 5):
            args += ["-e", str(self.dir / "error.log")]  # even before the config is read
        self.out = open(self.dir / "stderr.log", "w")  # noqa: SIM115 - open for nginx's life
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=subprocess.STDOUT)
        wait_for(lambda: self._up(ready_status), timeout=20, what="nginx in front of gunicorn")
        return self

    def logs(self) -> str:
        return "\n".join(
            p.read_text()[-2000:]
            for p in (self.dir / "stderr.log", self.dir / "error.log")
            if p.exists()
        )

    def _up(self, ready_status: int) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited ({self.proc.returncode}):\n{self.logs()}")
        try:
            return request(self.base, "GET", "/health", timeout=2)[0] == ready_status
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc is not None:
            self.out.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def app_server(make_sluice):
    return make_sluice(workers=2, TRUSTED_PROXIES="1", RATE_LIMIT_DEFAULT="5/minute")


@pytest.fixture(scope="module")
def nginx(request):
    nginx_binary()  # before starting anything
    server = Nginx(request.getfixturevalue("app_server").port)
    try:
        yield server.start()
    finally:
        server.stop()


def fetch(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    source: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    """One request to 127.0.0.1:`port` from the address `source`; the raw body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def request_log(server: Sluice, offset: int) -> list[dict]:
    """The app's JSON "request" log lines written after `offset`."""
    with open(server.log_path, "rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in entries if e.get("event") == "request"]


def test_nginx_is_installed():
    # a missing nginx fails the run (with the line to fix it), never skips these tests
    assert (
        "nginx version"
        in subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True).stderr
    )


def test_tokens_arrive_incrementally_through_nginx(nginx, fresh_limits):
    started = time.monotonic()
    stream = EventStream(
        nginx.base,
        PATH,
        {"prompt": "x sim:tokens=30 sim:rate=20"},
        headers={"Accept-Encoding": "gzip"},
    )
    assert stream.status == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert "content-encoding" not in stream.headers  # never gzipped
    arrivals = []
    while (event := stream.next_event()) is not None:
        if event["event"] == "token":
            arrivals.append(time.monotonic() - started)
    assert stream.events[-1]["data"]["reason"] == "stop"
    assert len(arrivals) >= 10, arrivals
    # 30 tokens at 20/s: buffered, they would all arrive together at the end
    assert arrivals[0] < 0.4 * arrivals[-1], arrivals


def test_the_real_client_ip_reaches_the_rate_limiter(nginx, app_server, fresh_limits):
    offset = app_server.log_path.stat().st_size
    answers = [
        request(nginx.base, "GET", MISSING, headers={"X-Forwarded-For": f"203.0.113.{i}"})
        for i in range(6)
    ]
    assert [status for status, _, _ in answers] == [404] * 5 + [429]
    _, headers, body = answers[-1]
    assert body["error"]["code"] == "rate_limited"
    assert int(headers["retry-after"]) > 0

    # another client machine has its own bucket, forged header or not
    status, _, raw = fetch(
        nginx.port, "GET", MISSING, headers={"X-Forwarded-For": "127.0.0.1"}, source=OTHER_CLIENT
    )
    assert status == 404, raw

    def logged() -> list[dict]:
        entries = [e for e in request_log(app_server, offset) if e["path"] == MISSING]
        return entries if len(entries) == 7 else []

    entries = wait_for(logged, 5, "the request log lines")
    assert [e["client_ip"] for e in entries] == ["127.0.0.1"] * 6 + [OTHER_CLIENT]
    assert [e["status"] for e in entries] == [404] * 5 + [429, 404]


def test_delete_through_nginx_cancels_a_stream_through_nginx(nginx, simulator, fresh_limits, tag):
    stream = EventStream(
        nginx.base, PATH, {"prompt": f"long sim:tokens=5000 sim:rate=30 sim:tag={tag}"}
    )
    assert stream.next_event()["event"] == "start"
    stream.until("token")

    status, _, body = request(nginx.base, "DELETE", f"{PATH}/{stream.stream_id}")
    assert (status, body) == (200, {"stream_id": stream.stream_id, "status": "cancelled"})
    # the upstream request was closed, not left running (and billing)
    assert simulator.record(tag, timeout=2)["state"] == "client_closed"
    events = stream.read_all()
    assert [e["event"] for e in events].count("done") == 1
    assert events[-1]["event"] == "done"
    assert events[-1]["data"]["reason"] == "cancelled"


def test_page_and_nginx_errors(nginx, fresh_limits):
    # GET / is the app's chat page, proxied (and compressed)
    status, headers, page = fetch(nginx.port, "GET", "/", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert headers.get("content-encoding") == "gzip"

    # a body above MAX_BODY_BYTES stops at nginx, answered in the API's JSON shape
    big = json.dumps({"prompt": "x" * (300 * 1024)}).encode()
    status, headers, raw = fetch(
        nginx.port, "POST", PATH, headers={"Content-Type": "application/json"}, body=big
    )
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert json.loads(raw)["error"]["code"] == "payload_too_large"

    # /metrics answers the local scraper only; to anyone else it does not exist
    assert fetch(nginx.port, "GET", "/metrics")[0] == 200
    status, headers, raw = fetch(nginx.port, "GET", "/metrics", source=OTHER_CLIENT)
    assert status == 404
    assert json.loads(raw)["error"]["code"] == "not_found"


def test_gunicorn_down_is_a_json_503():
    # nothing listens on the upstream port: nginx's 502 becomes the API's JSON shape
    server = Nginx(free_port())
    try:
        server.start(ready_status=503)
        status, headers, body = request(server.base, "POST", PATH, {"prompt": "x"})
    finally:
        server.stop()
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert headers["retry-after"] == "5"
    assert body["error"]["code"] == "internal_error"


STREAM_HEAD = (
    b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
)
MALFORMED = [
    ("bad request line", b"GARBAGE\r\n\r\n", 400, "invalid_request"),
    ("bad method", b"G\x01T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_request"),
    ("no Host", b"GET / HTTP/1.1\r\n\r\n", 400, "invalid_request"),
    ("two Hosts", b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "invalid_request"),
    (
        "bad header",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\x01: y\r\n\r\n",
        400,
        "invalid_request",
    ),
    (
        "headers too large",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
        400,
        "invalid_request",
    ),
    (
        "URI too long",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        414,
        "invalid_request",
    ),
    ("TRACE", b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    ("HTTP/2.0 on the plain port", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, "invalid_request"),
    (
        "bad chunk size",
        STREAM_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
        400,
        "invalid_request",
    ),
    (
        "19-hex-digit chunk size",
        STREAM_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"F" * 19 + b"\r\n{}",
        400,
        "invalid_request",
    ),
    (
        "Content-Length and chunked",
        STREAM_HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "invalid_request",
    ),
    (
        "Transfer-Encoding gzip",
        STREAM_HEAD + b"Transfer-Encoding: gzip\r\n\r\n",
        501,
        "invalid_request",
    ),
    (
        "the internal error paths from outside",
        b"GET /_sluice_error/400 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        404,
        "not_found",
    ),
]


def raw_exchange(port: int, raw: bytes, timeout: float = 30.0) -> tuple[int, dict, bytes, float]:
    """Send `raw` on a new connection and read the answer to its end (nginx closes after an
    error); status, lower-cased headers, body, seconds to the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        started = time.monotonic()
        conn.sendall(raw)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    took = time.monotonic() - started
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, took


@pytest.mark.parametrize(
    ("raw", "status", "code"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_nginx_own_errors_are_typed_json(nginx, raw, status, code):
    got, headers, body, took = raw_exchange(nginx.port, raw)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == code
    assert took < 5


def test_a_stalled_body_through_nginx_is_dropped_at_client_body_timeout(nginx):
    # nginx never answers its own timeouts (ngx_http_finalize_request terminates a 408):
    # with reset_timedout_connection the client gets a reset after client_body_timeout
    raw = STREAM_HEAD + b"Content-Length: 100\r\n\r\n{"
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=30) as conn:
        started = time.monotonic()
        conn.sendall(raw)
        try:
            data = conn.recv(65536)
        except ConnectionResetError:
            data = b""
        took = time.monotonic() - started
    assert data == b""
    assert 9 < took < 15  # client_body_timeout 10s
