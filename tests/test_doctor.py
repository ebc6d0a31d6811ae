"""The stream doctor (`python -m streaming.doctor`, a real process, its real exit status)
against real gunicorn, directly and through real nginx: the bundled nginx.conf, and
variants of it with the mistakes operators make (tests/nginx_variants.py).

The server pings every 4 s (HEARTBEAT_SECONDS=4), so ``--idle 12`` pings exactly
as a real stream does (every 4 s) and a 2 s proxy_read_timeout cuts it.
Verdict thresholds (held back >= 1 s; probes 250 ms apart; a buffered stream
arrives in one burst ~3 s late) are far from what either case measures, so the
outcome does not depend on the machine's load.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.harness import ROOT, free_port, wait_for
from tests import nginx_variants
from tests.sse_client import EventStream
from tests.test_nginx import Nginx, nginx_binary

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PATH = "/api/v1/diagnostics/stream"


@pytest.fixture(scope="module")
def server(make_sluice):
    # UPSTREAM_HEAD_TIMEOUT_SECONDS: the settings refuse one above the suite's 3 s upstream timeout
    return make_sluice(
        workers=2, HEARTBEAT_SECONDS="4", TRUSTED_PROXIES="1", UPSTREAM_HEAD_TIMEOUT_SECONDS="3"
    )


# nginx variant -> the doctor's arguments through it
THROUGH_NGINX = {
    "bundled": (None, ["--idle", "2"]),
    "buffering": (nginx_variants.buffering, []),
    "gzip": (nginx_variants.gzip_streams, []),
    "gzip+buffering": (nginx_variants.gzip_buffered, ["--json"]),
    "read-timeout-2s": (nginx_variants.short_read_timeout(2), ["--idle", "12"]),  # pings every 4 s
}


@pytest.fixture(scope="module")
def through_nginx(server):
    """Each nginx variant in front of `server`, and the doctor run through each, all at once
    (they only wait: ~6 s in all instead of ~20); the tests read the results."""
    nginx_binary()
    proxies = [Nginx(server.port, edit) for edit, _ in THROUGH_NGINX.values()]
    try:
        for proxy in proxies:
            proxy.start()
        runs = {
            name: Doctor(proxy.base, *args)
            for (name, (_, args)), proxy in zip(THROUGH_NGINX.items(), proxies, strict=True)
        }
        yield {name: run.result() for name, run in runs.items()}
    finally:
        for proxy in proxies:
            proxy.stop()


class Doctor:
    """The doctor as a process; straight to loopback, or through `proxy` as HTTP_PROXY."""

    def __init__(self, base: str, *args: str, proxy: str | None = None):
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        if proxy:
            env["HTTP_PROXY"] = proxy
        else:
            env["NO_PROXY"] = "127.0.0.1,localhost"
        self.args = [sys.executable, "-m", "streaming.doctor", base, *args]
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def result(self) -> subprocess.CompletedProcess:
        try:
            out, err = self.proc.communicate(timeout=50)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return subprocess.CompletedProcess(self.args, self.proc.returncode, out, err)


def doctor(base: str, *args: str, proxy: str | None = None) -> subprocess.CompletedProcess:
    return Doctor(base, *args, proxy=proxy).result()


def report(run: subprocess.CompletedProcess) -> str:
    return f"exit {run.returncode}\n{run.stdout}\n{run.stderr}"


# (a) -----------------------------------------------------------------------------------------
def test_directly_events_arrive_as_sent(server):
    run = doctor(server.base, "--json")
    assert run.returncode == 0, report(run)
    out = json.loads(run.stdout)
    assert out["exit_status"] == 0 and out["verdict"].startswith("OK")
    assert out["probes_received"] == 13
    assert out["held_back_s"] < 0.5
    m = out["measurement"]
    assert m["status"] == 200 and m["http_version"] == "HTTP/1.1" and m["ended"] == "done"
    assert m["headers"]["x-accel-buffering"] == "no"
    assert m["first_byte_s"] < 1.0


# (b) -----------------------------------------------------------------------------------------
@pytest.mark.nginx
def test_behind_the_bundled_nginx_conf_events_flow_and_survive_idle(through_nginx):
    run = through_nginx["bundled"]
    assert run.returncode == 0, report(run)
    assert "OK: events arrive as sent, and the connection survives 2 s of silence" in run.stdout
    assert "2 of 2 pings arrived" in run.stdout
    assert "Server: nginx" in run.stdout  # it saw the proxy, and found nothing wrong


# (c) -----------------------------------------------------------------------------------------
@pytest.mark.nginx
def test_nginx_with_buffering_forced_on_is_held_back_and_named(through_nginx):
    run = through_nginx["buffering"]
    assert run.returncode == 1, report(run)
    out = run.stdout
    assert "HELD BACK" in out and "13 of 13 probes arrived together" in out, out
    culprits = out.split("Likely culprits", 1)[1]
    assert "1. the proxy in front of Sluice talks HTTP/1.0 to it" in culprits, out
    assert "2. a reverse proxy answered (Server: nginx" in culprits, out
    assert "proxy_ignore_headers" in culprits and "X-Accel-Buffering" in culprits


@pytest.mark.nginx
def test_gzip_with_buffering_names_compression_first(through_nginx):
    run = through_nginx["gzip+buffering"]
    assert run.returncode == 1, report(run)
    out = json.loads(run.stdout)
    assert out["verdict"].startswith("HELD BACK") and out["held_back_s"] > 2.0
    assert out["measurement"]["headers"]["content-encoding"] == "gzip"
    assert out["suspects"][0]["key"] == "compression"
    assert "gzip" in out["suspects"][0]["evidence"]


@pytest.mark.nginx
def test_gzip_that_flushes_every_event_passes_with_a_note(through_nginx):
    # nginx's gzip flushes on every write when proxy buffering is off (X-Accel-Buffering: no)
    run = through_nginx["gzip"]
    assert run.returncode == 0, report(run)
    assert "OK: events arrive as sent" in run.stdout
    assert "Note: compression: Content-Encoding: gzip" in run.stdout


@pytest.mark.nginx
def test_a_proxy_read_timeout_below_the_ping_interval_cuts_the_idle_stream(through_nginx):
    run = through_nginx["read-timeout-2s"]  # --idle 12: pings every 4 s
    assert run.returncode == 1, report(run)
    out = run.stdout
    assert "CUT: the connection was cut during the 12 s silence" in out, out
    assert "proxy_read_timeout" in out.split("Likely culprits", 1)[1]


@pytest.fixture(scope="module")
def forward_proxy(tmp_path_factory):
    """Debian's tinyproxy as the environment's HTTP proxy (it announces itself with Via)."""
    binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
    if not Path(binary).exists():
        pytest.fail("tinyproxy is missing (make system-deps installs it)")
    folder = tmp_path_factory.mktemp("doctor-proxy")
    port = free_port()
    conf = folder / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 20\nAllow 127.0.0.1\n")
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(lambda: _listening(port), 10, "tinyproxy listening")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_the_doctor_goes_through_the_environments_proxy(server, forward_proxy):
    run = doctor(server.base, "--json", proxy=forward_proxy)
    assert run.returncode == 0, report(run)  # tinyproxy passes the stream on as it comes
    out = json.loads(run.stdout)
    assert "tinyproxy" in out["measurement"]["headers"]["via"]


# (d) -----------------------------------------------------------------------------------------
def test_an_unreachable_url_is_2(server):
    runs = [  # at once
        Doctor(f"http://127.0.0.1:{free_port()}"),
        Doctor(server.base + "/somewhere/else"),  # a 404: no probe stream there
        Doctor("127.0.0.1:1"),
        Doctor(server.base, "--idle", "121"),  # argparse's usage error: also 2
    ]
    refused, not_sluice, no_scheme, bad_idle = (run.result() for run in runs)
    assert refused.returncode == 2, report(refused)
    assert "UNREACHABLE: connection refused" in refused.stdout
    assert not_sluice.returncode == 2, report(not_sluice)
    assert "HTTP 404" in not_sluice.stdout
    assert no_scheme.returncode == 2 and "give the scheme" in no_scheme.stdout
    assert bad_idle.returncode == 2 and "--idle" in bad_idle.stderr


# the endpoint, for real -------------------------------------------------------------------
def test_a_client_that_leaves_ends_the_probe_stream_at_once(server):
    # during the silence the next ping is 4 s away: only the socket watch can notice this soon
    with EventStream(server.base, f"{PATH}?idle=120", method="GET") as stream:
        assert stream.status == 200
        while not (stream.events and stream.events[-1]["id"] == "13"):
            assert stream.next_event() is not None
        port = stream.local_port
        assert server.worker_of_connection(port) is not None
    wait_for(lambda: server.worker_of_connection(port) is None, timeout=2, what="probe ended")
