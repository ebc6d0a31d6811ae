"""The upstream pool's idle-connection check: correct, and never a trip through gevent's loop."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from devtools.harness import ROOT
from streaming.upstream import net
from streaming.upstream.client import Upstream
from streaming.upstream.net import socket_readable

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

# In a gevent-patched process: does the check let another greenlet run (i.e. yield)?
_YIELDS = """
from gevent import monkey; monkey.patch_all()
import socket, sys, gevent, httpcore2
from streaming.upstream.net import NonYieldingBackend
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
backend = {"ours": NonYieldingBackend(), "httpcore": httpcore2.SyncBackend()}[sys.argv[1]]
stream = backend.connect_tcp("127.0.0.1", server.getsockname()[1])
ran = []
gevent.spawn(ran.append, 1)
readable = stream.get_extra_info("is_readable")  # httpcore's idle-connection check
print(f"{bool(ran)} {readable}")
"""


def test_readable_means_data_or_eof():
    a, b = socket.socketpair()
    try:
        assert socket_readable(a) is False
        b.sendall(b"x")
        assert socket_readable(a) is True
        a.recv(1)
        assert socket_readable(a) is False
        b.close()
        assert socket_readable(a) is True  # EOF: the next recv returns b""
    finally:
        a.close()
    assert socket_readable(a) is True  # a closed socket is as good as gone
    assert socket_readable(None) is True


@pytest.mark.parametrize(("check", "yields"), [("ours", "False"), ("httpcore", "True")])
def test_under_gevent_the_check_does_not_yield(check, yields):
    # httpcore's own check (gevent's patched poll) parks the caller until the loop
    # comes round, once per idle pooled connection; ours must not.
    out = subprocess.run(
        [sys.executable, "-c", _YIELDS, check],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [yields, "False"]


def test_the_sdk_client_uses_the_backend_and_reuses_connections(simulator):
    upstream = Upstream(simulator.v1, "sk-test", 10)
    try:
        for _ in range(3):
            stream = upstream.open(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi sim:tokens=2"}]
            )
            assert "".join(stream.iter_text())
            stream.close()
        assert upstream.network.connections == 1  # opened through it once, then pooled
    finally:
        upstream.close()


@pytest.mark.parametrize("past_h11", [True, False])
def test_bodies_read_past_h11_or_through_it_give_the_same_text(simulator, monkeypatch, past_h11):
    # READ_BODY_PAST_H11 is the switch back to h11 (streaming.upstream.net): both paths work
    monkeypatch.setattr(net, "READ_BODY_PAST_H11", past_h11)
    upstream = Upstream(simulator.v1, "sk-test", 10)
    try:
        texts = []
        for _ in range(2):
            stream = upstream.open(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "same sim:tokens=30"}]
            )
            assert (stream._body is not None) is past_h11
            texts.append("".join(stream.iter_text()))
            stream.close()
        assert texts[0] == texts[1] and len(texts[0]) > 100
        assert upstream.network.connections == 1  # the connection was pooled either way
    finally:
        upstream.close()
