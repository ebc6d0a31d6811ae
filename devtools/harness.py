"""Real processes for integration tests: redis-server, the simulator, gunicorn.

Readiness is awaited by reading the processes' own output or by polling with
a deadline; nothing sleeps to synchronize.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from config.devservices import redis_server_binary

ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
VENV_BIN = Path(sys.executable).parent


def _die_with_parent() -> None:
    """Runs in the child: get SIGTERM if the test process dies (no orphaned servers)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll `predicate` until it returns something truthy, or fail after `timeout`."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        pause.wait(0.02)


def get_json(url: str, timeout: float = 30.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


class RedisServer:
    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--loglevel",
                "notice",
            ],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        for line in self.proc.stdout:  # wait for its own "Ready to accept connections"
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError("redis-server did not start")
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()


class Simulator:
    def __init__(self, *args: str):
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.base = ""

    def start(self) -> Simulator:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "devtools.simulator", "--port", "0", *self.args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        line = self.proc.stdout.readline()
        assert "http://" in line, line
        self.base = line.strip().split()[-1]
        return self

    @property
    def v1(self) -> str:
        return self.base + "/v1"

    def record(self, tag: str, wait: str = "ended", timeout: float = 10.0) -> dict:
        status, body = get_json(f"{self.base}/_sim/requests/{tag}?wait={wait}&timeout={timeout}")
        assert status == 200, (status, body)
        return body

    def stats(self) -> dict:
        return get_json(f"{self.base}/_sim/stats")[1]

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()


class Sluice:
    """A real gunicorn with gevent workers running app:app."""

    def __init__(self, env: dict[str, str], workers: int = 2):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.env = {
            # no proxy from this machine's environment: a test that wants one says so
            **{k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")},
            "PORT": str(self.port),
            "WEB_CONCURRENCY": str(workers),
            "APP_ENV": "test",
            "ACCESS_LOG": "",
            "GRACEFUL_TIMEOUT": "10",
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(os.environ.get("SLUICE_TEST_LOGS", "/tmp")) / f"sluice-{self.port}.log"

    def start(self) -> Sluice:
        self.log = open(self.log_path, "w")  # noqa: SIM115 - kept open for the server's life
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "-c", "config/gunicorn.conf.py", "app:app"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        wait_for(self._all_workers_up, timeout=30, what="gunicorn workers")
        return self

    def _all_workers_up(self) -> bool:
        if self.proc.poll() is not None:
            self.log.close()
            raise RuntimeError(f"gunicorn exited: {self.log_path.read_text()[-2000:]}")
        if len(self.worker_pids()) < self.workers:
            return False
        try:
            return get_json(self.base + "/health", timeout=2)[0] == 200
        except OSError:
            return False

    def worker_pids(self) -> list[int]:
        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children()]
        except psutil.NoSuchProcess:
            return []

    def worker_of_connection(self, local_port: int) -> int | None:
        """The pid of the worker holding the server side of our connection from `local_port`."""
        for pid in self.worker_pids():
            try:
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.raddr and conn.raddr.port == local_port:
                        return pid
            except psutil.NoSuchProcess:
                continue
        return None

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def begin_stop(self) -> None:
        """Quick shutdown (SIGINT); tests of graceful shutdown send SIGTERM themselves."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def stop(self) -> None:
        self.begin_stop()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.log.close()
