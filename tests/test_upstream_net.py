"""The upstream pool's idle-connection check: correct, and never a trip through gevent's loop."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from streaming.upstream import Upstream
from streaming.upstream_net import socket_readable
from tests.harness import ROOT

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

# In a gevent-patched process: does the check let another greenlet run (i.e. yield)?
_YIELDS = """
from gevent import monkey; monkey.patch_all()
import socket, sys, gevent
from httpcore2._utils import is_socket_readable
from streaming.upstream_net import socket_readable
check = {"ours": socket_readable, "httpcore": is_socket_readable}[sys.argv[1]]
a, b = socket.socketpair()
ran = []
gevent.spawn(ran.append, 1)
readable = check(a)
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
