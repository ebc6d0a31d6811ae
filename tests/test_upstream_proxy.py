"""Egress proxies (API.md §1): upstream requests honour HTTP(S)_PROXY, ALL_PROXY and NO_PROXY.

Regression (issue 16): the upstream client was given ``transport=`` to plug
in its network backend, which turns off httpx's environment proxies, so
``HTTPS_PROXY`` was silently ignored. A real proxy (Debian's tinyproxy) stands
between gunicorn and the simulator here; its log shows what went through it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from devtools.harness import free_port, wait_for
from tests.sse_client import EventStream, request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

STREAM = "/api/v1/completions/stream"


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not Path(binary).exists():
        pytest.fail("tinyproxy is missing (make system-deps installs it)")
    folder = tmp_path_factory.mktemp("proxy")
    port, log = free_port(), folder / "tinyproxy.log"
    conf = folder / "tinyproxy.conf"
    conf.write_text(
        f'Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{log}"\nLogLevel Info\n'
        "MaxClients 200\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
    )
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: _listening(port), 10, "tinyproxy listening")
        yield f"http://127.0.0.1:{port}", log
    finally:
        proc.terminate()
        proc.wait(10)


def proxied_requests(log: Path) -> int:
    return log.read_text(errors="replace").count("/v1/chat/completions") if log.exists() else 0


def test_http_proxy_carries_the_upstream_requests_and_cancel_still_closes_them(
    proxy, make_sluice, simulator, tag
):
    url, log = proxy
    server = make_sluice(workers=2, HTTP_PROXY=url, NO_PROXY="")
    before = proxied_requests(log)
    events = EventStream(server.base, STREAM, {"prompt": f"via proxy sim:tokens=5 sim:tag={tag}"})
    assert events.read_all()[-1]["data"]["reason"] == "stop"
    assert simulator.record(tag)["state"] == "completed"
    wait_for(lambda: proxied_requests(log) > before, 5, "the request in the proxy's log")

    cancel_tag = tag + "-c"
    stream = EventStream(
        server.base, STREAM, {"prompt": f"x sim:tokens=9999 sim:rate=30 sim:tag={cancel_tag}"}
    )
    stream.until("token")
    status, _, out = request(server.base, "DELETE", f"{STREAM}/{stream.stream_id}")
    assert (status, out["status"]) == (200, "cancelled")
    assert simulator.record(cancel_tag, timeout=5)["state"] == "client_closed"
    assert stream.read_all()[-1]["data"]["reason"] == "cancelled"


def test_no_proxy_sends_the_upstream_requests_directly(proxy, make_sluice, simulator, tag):
    url, log = proxy
    server = make_sluice(workers=2, HTTP_PROXY=url, ALL_PROXY=url, NO_PROXY="127.0.0.1")
    before = proxied_requests(log)
    events = EventStream(server.base, STREAM, {"prompt": f"direct sim:tokens=5 sim:tag={tag}"})
    assert events.read_all()[-1]["data"]["reason"] == "stop"
    assert simulator.record(tag)["state"] == "completed"
    assert proxied_requests(log) == before


def test_a_dead_proxy_is_an_upstream_error_not_a_hang(make_sluice):
    server = make_sluice(workers=2, HTTP_PROXY=f"http://127.0.0.1:{free_port()}", NO_PROXY="")
    events = EventStream(server.base, STREAM, {"prompt": "x sim:tokens=5"}).read_all()
    assert [e["event"] for e in events] == ["start", "error", "done"]
    assert events[1]["data"]["error"]["code"] == "upstream_error"
