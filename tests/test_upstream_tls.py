"""An HTTPS upstream (as the real API is): streams, connection reuse and cancel over TLS.

The simulator sits behind a TLS-terminating forwarder (this module, threads)
with a self-signed test certificate (tests/tls/, for 127.0.0.1 only) that
Sluice trusts through ``SSL_CERT_FILE``, as the SDK's HTTP client does.
The forwarder counts the TLS connections it accepted: pooled connections
must be reused after a stream read past h11 (streaming.upstream.net).
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from pathlib import Path

import pytest

from devtools.simulator import parse_directives, tokens_for
from streaming.upstream.client import Upstream
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PATH = "/api/v1/completions/stream"
TLS = Path(__file__).parent / "tls"


class Forwarder(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.accepted = 0
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(TLS / "cert.pem", TLS / "key.pem")
        super().__init__(("127.0.0.1", 0), _Pump)


class _Pump(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Forwarder = self.server  # type: ignore[assignment]
        try:
            client = server.context.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        server.accepted += 1
        with client, socket.create_connection(server.target) as upstream:
            back = threading.Thread(target=_copy, args=(upstream, client), daemon=True)
            back.start()
            _copy(client, upstream)
            back.join(10)


def _copy(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:  # either side gone: close both, so the other direction ends too
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


@pytest.fixture()
def https_upstream(simulator):
    host, port = simulator.base.removeprefix("http://").split(":")
    forwarder = Forwarder((host, int(port)))
    thread = threading.Thread(target=forwarder.serve_forever, daemon=True)
    thread.start()
    yield forwarder
    forwarder.shutdown()
    forwarder.server_close()


def test_streams_over_tls_reuse_the_connection_and_cancel(
    make_sluice, https_upstream, simulator, tag
):
    port = https_upstream.server_address[1]
    server = make_sluice(
        workers=1,
        OPENAI_BASE_URL=f"https://127.0.0.1:{port}/v1",
        SSL_CERT_FILE=str(TLS / "cert.pem"),
    )
    for i, directives in enumerate(["sim:tokens=300 sim:rate=0", "sim:tokens=40 sim:rate=200"] * 2):
        prompt = f"tls {i} {directives}"
        events = EventStream(server.base, PATH, {"prompt": prompt}).read_all()
        assert events[-1]["data"]["reason"] == "stop", events[-3:]
        text = "".join(e["data"]["token"] for e in events if e["event"] == "token")
        opts, asked = parse_directives(prompt)
        assert text == "".join(tokens_for(asked, opts["tokens"]))
    assert https_upstream.accepted == 1  # one worker, four streams, one pooled TLS connection

    stream = EventStream(
        server.base, PATH, {"prompt": f"slow sim:rate=5 sim:tokens=500 sim:tag={tag}"}
    )
    stream.until("token")
    status, _, body = request(server.base, "DELETE", f"{PATH}/{stream.stream_id}")
    assert (status, body["status"]) == (200, "cancelled")
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"
    assert simulator.record(tag, timeout=5)["state"] == "client_closed"


def test_the_body_is_read_past_h11_over_tls_too(https_upstream, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(TLS / "cert.pem"))
    upstream = Upstream(f"https://127.0.0.1:{https_upstream.server_address[1]}/v1", "sk-test", 10)
    try:
        for _ in range(2):
            stream = upstream.open(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi sim:tokens=50"}]
            )
            assert stream._body is not None  # not h11's fallback path
            assert "".join(stream.iter_text()) == "".join(tokens_for("hi", 50))
            stream.close()
        assert upstream.network.connections == 1 and https_upstream.accepted == 1
    finally:
        upstream.close()
