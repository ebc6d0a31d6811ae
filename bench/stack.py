"""Shared pieces of the benchmark suite: the processes under test, /proc readings, statistics.

Every process is a real one, started with the test harness's helpers
(``devtools/harness.py``): a redis-server on a free port, the simulator, gunicorn
with gevent workers running Sluice (``app:app``) or the common design
(``bench.common_design:app``). `Stack` starts them and stops them all, in
reverse order, even when a benchmark fails. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import devtools.harness  # noqa: E402
from devtools.harness import (  # noqa: E402
    VENV_BIN,
    RedisServer,
    Simulator,
    Sluice,
    get_json,
    wait_for,
)

__all__ = [
    "BENCH_ENV",
    "OUT",
    "RESULTS",
    "ROOT",
    "CommonServer",
    "Stack",
    "cpu_seconds",
    "machine",
    "md_table",
    "pct",
    "raise_nofile",
    "rss_bytes",
    "wait_for",
    "worker_of_connection",
    "workers_of_connections",
]

OUT = ROOT / "bench" / "out"  # raw figures, profiles, logs (git-ignored)
RESULTS = ROOT / "bench" / "RESULTS.md"  # how to reproduce, and the latest suite
HISTORY = ROOT / "bench" / "HISTORY.md"  # every earlier suite and single-bench run, oldest first
# In RESULTS.md, everything after this line is the latest suite (see `write_results`).
LATEST = "<!-- latest suite: `python -m bench` replaces everything below this line -->"

# Sluice settings for load: limits out of the way (all traffic comes from 127.0.0.1).
BENCH_ENV = {
    "WORKER_CONNECTIONS": "6000",
    "RATE_LIMIT_DEFAULT": "1000000/minute",
    "RATE_LIMIT_STREAM": "1000000/minute",
    "MAX_CONCURRENT_STREAMS": "100000",
    "HEARTBEAT_SECONDS": "15",
}


def raise_nofile() -> tuple[int, int]:
    """Raise the soft open-files limit to the hard one; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU seconds of these processes, from /proc."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def rss_bytes(pids: list[int]) -> int:
    """Sum of the resident set sizes of these processes, from /proc."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def workers_of_connections(
    worker_pids: list[int], server_port: int, client_ports: list[int]
) -> dict[int, int]:
    """Which of `worker_pids` accepted each of our connections (client port -> pid); ports
    not accepted yet are missing. Like devtools/harness.py's worker_of_connection, but reads
    /proc directly and for several connections at once (psutil takes ~30 ms a call here)."""
    wanted = set(client_ports)
    inodes = {
        inode: remote
        for local, remote, inode in tcp_sockets()
        if remote in wanted and local == server_port
    }
    return owners_of_sockets(inodes, worker_pids)


def tcp_sockets() -> Iterator[tuple[int, int, str]]:
    """(local port, remote port, ``socket:[inode]``) of every TCP socket on this machine."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines)
                for line in lines:
                    fields = line.split()
                    if fields[9] != "0":
                        local = int(fields[1].rsplit(":", 1)[1], 16)
                        remote = int(fields[2].rsplit(":", 1)[1], 16)
                        yield local, remote, f"socket:[{fields[9]}]"
        except OSError:
            continue


def owners_of_sockets(inodes: dict[str, int], pids: list[int]) -> dict[int, int]:
    """For sockets named by inode (``socket:[N]`` -> port): port -> the pid among `pids`
    that holds it (read from /proc/<pid>/fd)."""
    found: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                port = inodes.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if port is not None:
                found[port] = pid
    return found


def worker_of_connection(worker_pids: list[int], server_port: int, client_port: int):
    """The pid among `worker_pids` that accepted our connection from `client_port`, or None."""
    return workers_of_connections(worker_pids, server_port, [client_port]).get(client_port)


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def md_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores ({model or 'unknown CPU'}), "
        f"{mem:.0f} GiB RAM, Linux {platform.release()}, Python {platform.python_version()}"
    )


def append_results(name: str, markdown: str) -> None:
    """Append one benchmark's section (a single bench run with --write) to bench/HISTORY.md."""
    with open(HISTORY, "a") as out:
        out.write(f"\n## {name} — {now()} — {machine()}\n\n{markdown}")


def write_results(report: str) -> None:
    """Make `report` the latest suite of bench/RESULTS.md; the one it replaces goes to the
    end of bench/HISTORY.md (oldest first)."""
    text = RESULTS.read_text()
    head, marker, previous = text.partition(LATEST)
    if not marker:  # no marker: keep the file, add one
        head, marker, previous = text.rstrip() + "\n\n## Latest suite\n\n", LATEST, ""
    if previous.strip():
        with open(HISTORY, "a") as out:
            out.write("\n" + previous.strip() + "\n")
    RESULTS.write_text(head + marker + "\n\n" + report.strip() + "\n")


def now() -> str:
    return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


class CommonServer(Sluice):
    """gunicorn + gevent (same worker class and count as Sluice) running the common design."""

    def __init__(self, env: dict[str, str], workers: int = 2, worker_connections: int = 6000):
        super().__init__(env, workers)
        self.worker_connections = worker_connections
        self.log_path = self.log_path.with_name(f"common-design-{self.port}.log")

    def start(self) -> CommonServer:
        self.log = open(self.log_path, "w")  # noqa: SIM115 - kept open for the server's life
        self.proc = subprocess.Popen(
            [
                str(VENV_BIN / "gunicorn"),
                "--worker-class",
                "gevent",
                "--workers",
                str(self.workers),
                "--worker-connections",
                str(self.worker_connections),
                "--bind",
                f"127.0.0.1:{self.port}",
                "--timeout",
                "30",
                "--graceful-timeout",
                "5",
                "--keep-alive",
                "5",
                "bench.common_design:app",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # like the harness's servers: die with the process that started them
            preexec_fn=getattr(devtools.harness, "_die_with_parent", None),
        )
        wait_for(self._all_workers_up, timeout=30, what="common design workers")
        return self


class Stack:
    """The processes of one benchmark; ``with Stack() as s:`` stops them all at the end."""

    def __init__(self) -> None:
        self._started: list = []
        raise_nofile()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        while self._started:
            proc = self._started.pop()
            try:
                proc.stop()
            except Exception as err:  # keep stopping the others
                print(f"bench: stopping {type(proc).__name__} failed: {err}", file=sys.stderr)
                if getattr(proc, "proc", None) is not None and proc.proc.poll() is None:
                    os.killpg(proc.proc.pid, signal.SIGKILL)

    def redis(self) -> RedisServer:
        server = RedisServer().start()
        self._started.append(server)
        return server

    def simulator(self, *args: str) -> Simulator:
        sim = Simulator(*args).start()
        self._started.append(sim)
        return sim

    def sluice(self, redis_server: RedisServer, sim: Simulator, workers: int = 2, **env: str):
        full = {
            "REDIS_URL": redis_server.url,
            "OPENAI_BASE_URL": sim.v1,
            "OPENAI_API_KEY": "sk-bench",
            **BENCH_ENV,
            **env,
        }
        server = Sluice(full, workers=workers).start()
        self._started.append(server)
        return server

    def common(self, sim: Simulator, workers: int = 2) -> CommonServer:
        env = {"OPENAI_BASE_URL": sim.v1, "OPENAI_API_KEY": "sk-bench"}
        server = CommonServer(env, workers=workers).start()
        self._started.append(server)
        return server

    def release(self, proc) -> None:
        """Stop one process now (e.g. a server only one step needs)."""
        if proc in self._started:
            self._started.remove(proc)
        proc.stop()


def sim_stats(sim: Simulator) -> dict:
    return get_json(f"{sim.base}/_sim/stats")[1]


def wait_sim_idle(sim: Simulator, timeout: float = 30.0) -> bool:
    """Wait until the simulator has no open stream (the previous step drained)."""
    try:
        wait_for(lambda: sim_stats(sim)["open_streams"] == 0, timeout, "simulator idle")
        return True
    except AssertionError:
        return False
