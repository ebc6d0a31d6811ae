"""Reconnect storm: N detached generations on server A, then every client resumes at once on B.

Two gunicorn servers (A and B, 2 gevent workers each) share one redis-server
and one simulator. Each run:

1. ``POST /api/v1/completions`` N times at once on A (`N` = 300; each
   ``sim:tokens=100 sim:rate=20 sim:delay=0``, a distinct prompt): N detached
   generations, 5 s long each;
2. as soon as every POST is answered, N ``GET /api/v1/completions/stream/<id>``
   with ``Last-Event-ID: 0`` at once on B (the way clients reconnect after a
   deploy or a network blip), each read to its ``done`` (or its end);
3. meanwhile ``CLIENT LIST`` on the redis-server every `SAMPLE_EVERY` s: each
   client connection's port is mapped to the worker process holding it (from
   /proc), and the most connections any worker of B (and of A) held is kept.

Checked for every resume: HTTP 200, event ids exactly 1..done (no gap, no
duplicate), ``done`` with reason ``stop``, and the text of its ``token``
events equal to what the simulator produced for that prompt
(`devtools.simulator.tokens_for`, the simulator's own function). Reported
per run: resumes complete and intact, lost (gaps, missing or wrong text),
HTTP errors by status, first replayed event (connect -> first event frame)
p50/p99, time to the last ``done``, B's worker CPU per resume (its replay and
following it to ``done``), and Redis connections per worker.

Baseline in the same run: `ALONE` resumes one at a time on B of a
generation running on A (first replayed event, median), and the pool bound
the app states (``streaming.redis_conn.MAX_CONNECTIONS``). Targets: all
complete, nothing lost, first replayed event p50 <= 250 ms, Redis
connections per worker within the bound.

The client is one thread with non-blocking sockets (selectors): every
connection is opened in the same loop pass, every receive is timestamped.
Everything ends by itself: each run has a deadline (`RUN_TIMEOUT`).

    python -m bench.storm [--quick] [--streams 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import statistics
import sys
import threading
import time

import redis

from bench.stack import (
    OUT,
    Stack,
    cpu_seconds,
    md_table,
    owners_of_sockets,
    pct,
    tcp_sockets,
    wait_sim_idle,
)
from devtools.simulator import tokens_for

__all__ = ["run"]

N, QUICK_N = 300, 100
RUNS, QUICK_RUNS = 3, 1
TOKENS, RATE = 100, 20
ALONE = 10
RUN_TIMEOUT = 60.0
SAMPLE_EVERY = 0.2
TARGET_FIRST_EVENT_MS = 250.0
PATH = "/api/v1/completions"


def _prompt(tag: str) -> str:
    return f"storm {tag} sim:tokens={TOKENS} sim:rate={RATE} sim:delay=0"


def _expected(tag: str) -> str:
    return "".join(tokens_for(f"storm {tag}", TOKENS))  # the simulator strips its directives


# -- a many-connection HTTP/1.1 client ------------------------------------------------------


class Flight:
    """One request on its own connection: response head, body (chunked or sized), SSE events."""

    def __init__(self, port: int, request: bytes, tag: str = ""):
        self.port, self.request, self.tag = port, request, tag
        self.sock: socket.socket | None = None
        self.t0 = self.t_head = self.t_first = self.t_end = 0.0
        self.status = 0
        self.headers: dict[str, str] = {}
        self._raw = bytearray()
        self._chunked = False
        self._length: int | None = None
        self.body = bytearray()  # the decoded body (JSON answers)
        self._sse = bytearray()
        self.events: list[tuple[str, str, str]] = []  # (id, event, data)
        self.finished = False
        self.error = ""

    # the body ----------------------------------------------------------------------------

    def feed(self, data: bytes, now: float) -> None:
        self._raw += data
        if not self.status:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._raw[:end]).decode("latin-1").split("\r\n")
            del self._raw[: end + 4]
            self.status, self.t_head = int(lines[0].split(" ")[1]), now
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
            if not self._chunked:
                self._length = int(self.headers.get("content-length", "0"))
        if self._chunked:
            self._dechunk(now)
        else:
            self.body += self._raw
            self._raw.clear()
            if self._length is not None and len(self.body) >= self._length:
                self._end(now)

    def _dechunk(self, now: float) -> None:
        while True:
            line_end = self._raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self._raw[:line_end]).split(b";")[0], 16)
            if len(self._raw) < line_end + 2 + size + 2:
                return
            chunk = bytes(self._raw[line_end + 2 : line_end + 2 + size])
            del self._raw[: line_end + 2 + size + 2]
            if size == 0:
                self._end(now)
                return
            self._frames(chunk, now)
            if self.finished:
                return

    def _frames(self, chunk: bytes, now: float) -> None:
        self._sse += chunk
        while (cut := self._sse.find(b"\n\n")) >= 0:
            frame = bytes(self._sse[:cut]).decode()
            del self._sse[: cut + 2]
            fields: dict[str, str] = {}
            for line in frame.split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if "event" not in fields:
                continue  # a heartbeat comment
            if not self.t_first:
                self.t_first = now
            self.events.append((fields.get("id", ""), fields["event"], fields.get("data", "")))
            if fields["event"] == "done":
                self._end(now)
                return

    def _end(self, now: float) -> None:
        self.finished, self.t_end = True, now

    # checks ------------------------------------------------------------------------------

    def json(self) -> dict:
        try:
            return json.loads(bytes(self.body))
        except ValueError:
            return {}

    def verdict(self) -> str:
        """'ok', or what is wrong with this resume."""
        if self.error:
            return self.error
        if self.status != 200:
            return f"HTTP {self.status}"
        if not self.events or self.events[-1][1] != "done":
            return "no done"
        ids = [int(i) for i, _, _ in self.events]
        if ids != list(range(1, len(ids) + 1)):
            return "lost or repeated event"
        done = json.loads(self.events[-1][2])
        if done["reason"] != "stop":
            return f"done {done['reason']}"
        text = "".join(json.loads(d)["token"] for _, e, d in self.events if e == "token")
        if text != _expected(self.tag):
            return "wrong text"
        return "ok"


def fly(flights: list[Flight], timeout: float) -> None:
    """Open every connection in one pass, send, and read until each ends or the deadline."""
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    try:
        for f in flights:
            f.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            f.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            f.sock.setblocking(False)
            f.t0 = time.perf_counter()
            f.sock.connect_ex(("127.0.0.1", f.port))
            sel.register(f.sock, selectors.EVENT_WRITE, f)
        left = len(flights)
        while left and time.monotonic() < deadline:
            for key, mask in sel.select(timeout=0.5):
                f = key.data
                if mask & selectors.EVENT_WRITE:
                    err = f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        f.error, f.finished = f"connect: {os.strerror(err)}", True
                    else:
                        f.sock.sendall(f.request)  # small: fits the socket buffer
                        sel.modify(f.sock, selectors.EVENT_READ, f)
                        continue
                else:
                    now = time.perf_counter()
                    try:
                        data = f.sock.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        data, f.error = b"", f"recv: {exc}"
                    if data:
                        f.feed(data, now)
                    else:
                        if not f.finished:
                            f.error = f.error or "closed before the end"
                        f.finished = True
                if f.finished:
                    sel.unregister(f.sock)
                    f.sock.close()
                    left -= 1
        for f in flights:
            if not f.finished:
                f.error = "deadline"
    finally:
        for f in flights:
            if f.sock is not None and f.sock.fileno() >= 0:
                try:
                    sel.unregister(f.sock)
                except (KeyError, ValueError):
                    pass
                f.sock.close()
        sel.close()


def _post(port: int, tag: str) -> bytes:
    body = json.dumps({"prompt": _prompt(tag)}).encode()
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _resume(port: int, stream_id: str) -> bytes:
    return (
        f"GET {PATH}/stream/{stream_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Accept: text/event-stream\r\nLast-Event-ID: 0\r\nConnection: close\r\n\r\n"
    ).encode()


# -- Redis connections per worker -----------------------------------------------------------


def _sockets_to(pids: list[int], remote_port: int) -> dict[int, int]:
    """local port -> pid, for the TCP sockets of `pids` connected to 127.0.0.1:remote_port."""
    inodes = {inode: local for local, remote, inode in tcp_sockets() if remote == remote_port}
    return owners_of_sockets(inodes, pids)


class ConnSampler:
    """Every SAMPLE_EVERY s: CLIENT LIST, each client port -> worker pid; keeps the maxima."""

    def __init__(self, redis_url: str, redis_port: int, servers: dict[str, list[int]]):
        self.client = redis.Redis.from_url(redis_url)
        self.redis_port = redis_port
        self.servers = servers
        self.max_per_worker: dict[str, int] = dict.fromkeys(servers, 0)
        self.max_total: dict[str, int] = dict.fromkeys(servers, 0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConnSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()

    def sample(self) -> None:
        ports = {int(c["addr"].rsplit(":", 1)[1]) for c in self.client.client_list()}
        pids = [pid for pids in self.servers.values() for pid in pids]
        owner = _sockets_to(pids, self.redis_port)
        for name, server_pids in self.servers.items():
            counts = dict.fromkeys(server_pids, 0)
            for port in ports:
                if owner.get(port) in counts:
                    counts[owner[port]] += 1
            self.max_per_worker[name] = max(self.max_per_worker[name], max(counts.values()))
            self.max_total[name] = max(self.max_total[name], sum(counts.values()))
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            try:
                self.sample()
            except (redis.RedisError, OSError, ValueError) as exc:
                print(f"bench.storm: sampling failed: {exc}", file=sys.stderr)


# -- the scenario ---------------------------------------------------------------------------


def _start(port: int, tags: list[str]) -> tuple[list[Flight], dict[str, str]]:
    posts = [Flight(port, _post(port, tag), tag) for tag in tags]
    fly(posts, RUN_TIMEOUT)
    ids = {}
    for f in posts:
        if f.status == 202:
            ids[f.tag] = f.json()["stream_id"]
    return posts, ids


def storm_run(a, b, sampler: ConnSampler, n: int, run_no: int) -> dict:
    tags = [f"{run_no}-{i}" for i in range(n)]
    t0 = time.perf_counter()
    posts, ids = _start(a.port, tags)
    started_s = time.perf_counter() - t0
    resumes = [Flight(b.port, _resume(b.port, ids[tag]), tag) for tag in tags if tag in ids]
    b_pids = sampler.servers["B"]
    cpu0 = cpu_seconds(b_pids)
    fly(resumes, RUN_TIMEOUT)
    b_cpu_ms = (cpu_seconds(b_pids) - cpu0) * 1000 / max(1, len(resumes))
    verdicts: dict[str, int] = {}
    for f in resumes:
        v = f.verdict()
        verdicts[v] = verdicts.get(v, 0) + 1
    first = [(f.t_first - f.t0) * 1000 for f in resumes if f.status == 200 and f.t_first]
    last_done = max((f.t_end for f in resumes if f.finished), default=t0) - resumes[0].t0
    lost = sum(n for v, n in verdicts.items() if v in ("lost or repeated event", "wrong text"))
    statuses: dict[str, int] = {}
    for f in resumes:
        if f.status != 200:
            key = f"HTTP {f.status}" if f.status else (f.error or "no answer")
            statuses[key] = statuses.get(key, 0) + 1
    post_errors = sum(1 for f in posts if f.status != 202)
    return {
        "run": run_no,
        "streams": n,
        "started": len(ids),
        "post_errors": post_errors,
        "post_phase_s": started_s,
        "complete": verdicts.get("ok", 0),
        "lost": lost,
        "verdicts": verdicts,
        "http_errors": statuses,
        "first_event_p50_ms": pct(first, 50),
        "first_event_p99_ms": pct(first, 99),
        "last_done_s": last_done,
        "b_cpu_ms_per_resume": b_cpu_ms,
    }


def alone(a, b, tries: int) -> list[float]:
    """First replayed event of resumes one at a time on B, each of a generation running on A."""
    out = []
    for i in range(tries):
        tag = f"alone-{i}"
        _, ids = _start(a.port, [tag])
        if tag not in ids:
            continue
        time.sleep(0.5)  # the generation is under way: replay, then follow
        f = Flight(b.port, _resume(b.port, ids[tag]), tag)
        fly([f], RUN_TIMEOUT)
        if f.status == 200 and f.t_first:
            out.append((f.t_first - f.t0) * 1000)
    return out


def run(quick: bool = False, n: int | None = None, runs: int | None = None) -> dict:
    n = n or (QUICK_N if quick else N)
    runs = runs or (QUICK_RUNS if quick else RUNS)
    try:
        from streaming.redis_conn import MAX_CONNECTIONS as bound
    except ImportError:
        bound = None
    results = []
    with Stack() as stack:
        redis_server = stack.redis()
        sim = stack.simulator("--rate", str(RATE), "--delay", "0")
        a = stack.sluice(redis_server, sim)
        b = stack.sluice(redis_server, sim)
        servers = {"A": a.worker_pids(), "B": b.worker_pids()}
        baseline = alone(a, b, 3 if quick else ALONE)
        wait_sim_idle(sim, 30)
        with ConnSampler(redis_server.url, redis_server.port, servers) as sampler:
            idle_per_worker = dict(sampler.max_per_worker)
            sampler.sample()
            idle_per_worker = dict(sampler.max_per_worker)
            for r in range(runs):
                sampler.max_per_worker = dict.fromkeys(servers, 0)
                sampler.max_total = dict.fromkeys(servers, 0)
                result = storm_run(a, b, sampler, n, r)
                sampler.sample()
                result["redis_conns_max_per_worker"] = dict(sampler.max_per_worker)
                result["redis_conns_max_total"] = dict(sampler.max_total)
                results.append(result)
                print(f"bench.storm: run {r}: {json.dumps(result)}", file=sys.stderr)
                wait_sim_idle(sim, 30)
    return report(results, baseline, idle_per_worker, bound, n)


def report(results: list[dict], baseline: list[float], idle: dict, bound, n: int) -> dict:
    alone_ms = statistics.median(baseline) if baseline else float("nan")
    rows = []
    for r in results:
        errors = ", ".join(f"{k} × {v}" for k, v in sorted(r["http_errors"].items())) or "0"
        other = {
            k: v
            for k, v in r["verdicts"].items()
            if k != "ok" and not k.startswith("HTTP") and k not in ("lost or repeated event",)
        }
        rows.append(
            [
                r["run"] + 1,
                f"{r['started']}/{n}"
                + (f" ({r['post_errors']} refused)" if r["post_errors"] else ""),
                f"{r['post_phase_s']:.2f}",
                f"{r['complete']}/{n}",
                r["lost"],
                errors,
                ", ".join(f"{k} × {v}" for k, v in sorted(other.items())) or "–",
                f"{r['first_event_p50_ms']:.0f} / {r['first_event_p99_ms']:.0f}",
                f"{r['last_done_s']:.1f}",
                f"{r['b_cpu_ms_per_resume']:.1f}",
                f"{r['redis_conns_max_per_worker']['B']} ({r['redis_conns_max_total']['B']})",
                f"{r['redis_conns_max_per_worker']['A']} ({r['redis_conns_max_total']['A']})",
            ]
        )
    table = md_table(
        [
            "run",
            "generations started on A",
            "starting them took s",
            "resumes complete and intact on B",
            "lost (gap, repeat or wrong text)",
            "HTTP errors",
            "other failures",
            "first replayed event p50 / p99 ms",
            "last done after s",
            "B worker CPU ms per resume (replay + follow to done)",
            "Redis conns, most per worker of B (all of B)",
            "same, A",
        ],
        rows,
    )
    all_ok = all(r["complete"] == n for r in results)
    lost = sum(r["lost"] for r in results)
    p50 = max((r["first_event_p50_ms"] for r in results), default=float("nan"))
    most = max((r["redis_conns_max_per_worker"]["B"] for r in results), default=0)
    lines = [
        f"- Baseline, same run: one resume alone on B of a generation running on A: first "
        f"replayed event median {alone_ms:.1f} ms ({len(baseline)} tries); Redis connections per "
        f"worker before the storms: B {idle.get('B', 0)}, A {idle.get('A', 0)}; the app's pool "
        f"bound per worker (`streaming.redis_conn.MAX_CONNECTIONS`): {bound if bound else '–'}.",
        f"- All complete: {'yes' if all_ok else 'NO'}; lost: {lost} over {len(results)} runs; "
        f"first replayed event p50 (worst run) {p50:.0f} ms (target ≤ "
        f"{TARGET_FIRST_EVENT_MS:.0f} ms: {'met' if p50 <= TARGET_FIRST_EVENT_MS else 'MISSED'}); "
        f"Redis connections per worker of B at most {most}"
        + (f" (bound {bound}: {'met' if most <= bound else 'MISSED'})" if bound else "")
        + ".",
    ]
    markdown = (
        f"### Reconnect storm: {n} detached generations on server A, then {n} resumes at once "
        f"on server B with `Last-Event-ID: 0` (2 servers × 2 gevent workers, one Redis; "
        f"{TOKENS} tokens at {RATE} tokens/s)\n\n{table}\n" + "\n".join(lines) + "\n"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "storm.json").write_text(json.dumps({"runs": results, "alone_ms": baseline}, indent=1))
    return {
        "markdown": markdown,
        "data": {
            "runs": results,
            "alone_ms": alone_ms,
            "bound": bound,
            "idle": idle,
            "all_complete": all_ok,
            "lost": lost,
            "first_event_p50_ms": p50,
            "redis_conns_per_worker": most,
            "streams": n,
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--streams", type=int)
    parser.add_argument("--runs", type=int)
    args = parser.parse_args()
    result = run(args.quick, args.streams, args.runs)
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
