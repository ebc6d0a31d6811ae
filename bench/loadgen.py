"""Load generator: N concurrent SSE streams over raw sockets, in its own process (gevent).

    python -m bench.loadgen --kind sluice|direct|common --url http://127.0.0.1:PORT \\
        --streams N [--rate 50] [--tokens 100-200] [--warmup S] [--duration S] [--start-at T]

prints one JSON object (raw figures; `merge` combines several processes).

Closed loop: each of the N simulated clients starts a stream, reads it to its
end, and starts the next one, so N streams are always open; their first
starts are spread over one mean stream length, so connections arrive at a
steady pace. Streams ask for ``sim:tokens=K sim:rate=R sim:delay=0`` with K
drawn from the ``--tokens`` range (seeded, the same for every target).
Figures are kept for a window of ``--duration`` seconds after ``--warmup``;
when it closes no stream starts any more and those in flight are read to
their end (at most ``DRAIN`` seconds).

``--burst`` (bench/starts.py): open loop instead, every simulated client
starts exactly one stream at ``--start-at``, at the same instant; every
figure counts, and the window runs from that instant to the end of the last
stream, so delivered tokens/s is all tokens over the length of the burst.

HTTP/1.1 is written by hand (one request per connection); the response body
(chunked) is scanned, never decoded: a receive is cut at its last blank line
(``\\n\\n``, the end of an SSE frame; chunk-size lines never hold one) and the
complete frames are searched for a marker:

- ``sluice``: ``event: token`` frames; several upstream deltas may be joined
  in one event, so the tokens are those of the ``done`` event's
  ``metadata.token_count``;
- ``direct`` (the simulator's ``/v1/chat/completions``): ``data:`` chunks
  with a content delta (``"delta":{"content":``), until ``data: [DONE]``;
- ``common`` (bench/common_design.py): ``data:`` chunks of type token.

Per stream: TTFT = from just before ``connect()`` to the receive holding the
first token frame, for the streams whose first token arrives inside the
window (also kept, for diagnosis: connect -> response head, and Sluice's own
``metadata.ttft_ms``, counted from the generation's creation); gaps = time
between receives holding token frames inside the window (frames that arrive
in one receive count a gap of 0). Delivered tokens/s = tokens received inside
the window / its length, where a stream's token count is shared out over its
frames (exact for the simulator: one token per frame; for Sluice the ``done``
event's ``token_count`` over its token events).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import socket as _stdsocket
import sys
import time
from urllib.parse import urlsplit

__all__ = ["Hist", "merge", "summarize"]

DRAIN = 30.0  # seconds the streams in flight at the end of the window may take to finish
STREAM_TIMEOUT = 90.0  # one stream, connect to end
_LOG_STEP = math.log(1.01)  # histogram buckets 1 % wide, from 10 µs


class Hist:
    """Log-bucketed histogram of durations (1 % resolution), mergeable across processes."""

    def __init__(self, counts: dict[int, int] | None = None):
        self.counts: dict[int, int] = counts or {}

    def add(self, seconds: float, n: int = 1) -> None:
        us = seconds * 1e6
        bucket = 0 if us < 10 else int(math.log(us / 10) / _LOG_STEP) + 1
        self.counts[bucket] = self.counts.get(bucket, 0) + n

    def merge(self, other: Hist) -> None:
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def pct_ms(self, p: float) -> float:
        total = self.n
        if not total:
            return math.nan
        rank = max(1, math.ceil(p / 100 * total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return 0.0 if bucket == 0 else 10 * 1.01**bucket / 1000  # upper edge, ms
        return math.nan

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> Hist:
        return cls({int(k): v for k, v in data.items()})


KINDS = {
    # kind: (path, token marker, end marker)
    "sluice": ("/api/v1/completions/stream", b"event: token", b"event: done"),
    "direct": ("/v1/chat/completions", b'"delta":{"content":', b"data: [DONE]"),
    "common": ("/api/v1/completions/stream", b'data: {"type": "token"', b'"type": "done"'),
}


def request_bytes(kind: str, host: str, port: int, prompt: str) -> bytes:
    path = KINDS[kind][0]
    if kind == "direct":
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
        }
    else:
        body = {"prompt": prompt}
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


class StreamFailed(Exception):
    pass


class Generator:
    def __init__(self, args: argparse.Namespace):
        import os

        os.environ.setdefault("GEVENT_RESOLVER", "block")  # no thread pool for 127.0.0.1
        from gevent import get_hub, socket

        self.socket, self.hub = socket, get_hub()
        url = urlsplit(args.url)
        self.host, self.port = url.hostname, url.port
        self.kind = args.kind
        self.streams, self.rate = args.streams, args.rate
        self.tmin, self.tmax = (int(x) for x in args.tokens.split("-"))
        self.first = args.first_stream
        delay = args.start_at - time.time() if args.start_at else 0.5
        self.t0 = time.perf_counter() + max(0.0, delay)
        self.w0 = self.t0 + args.warmup
        self.w1 = self.w0 + args.duration
        self.stagger = (self.tmin + self.tmax) / 2 / self.rate
        # --burst: every user starts one stream at t0, all figures count, and the window
        # is from t0 to the end of the last stream (bench/starts.py).
        self.burst = args.burst
        self.ends: list[float] = []
        if self.burst:
            self.w0, self.w1 = self.t0 - 1.0, self.t0 + STREAM_TIMEOUT
        self.ttft: list[float] = []
        self.head: list[float] = []  # connect -> response head (sluice: with the start event)
        self.server_ttft: list[float] = []  # sluice: the done event's metadata.ttft_ms
        self.gaps = Hist()
        self.gap_max = 0.0
        self.tokens = 0.0  # tokens received inside the window
        self.token_events = 0  # token frames received inside the window
        self.completed = 0
        self.started = 0
        self.errors: dict[str, int] = {}
        self.cpu_window: float | None = None

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def user(self, index: int) -> None:
        import gevent

        rng = random.Random(1000 + self.first + index)
        if self.burst:
            gevent.sleep(max(0.0, self.t0 - time.perf_counter()))
            tokens = rng.randint(self.tmin, self.tmax)
            prompt = (
                f"burst {self.first + index} sim:tokens={tokens} sim:rate={self.rate} sim:delay=0"
            )
            try:
                self.one_stream(prompt, tokens)
                self.ends.append(time.perf_counter())
            except StreamFailed as exc:
                self.error(str(exc))
            except (OSError, EOFError) as exc:
                self.error(type(exc).__name__)
            except gevent.Timeout:
                self.error("timeout")
            return
        gevent.sleep(max(0.0, self.t0 + index * self.stagger / self.streams - time.perf_counter()))
        n = 0
        while time.perf_counter() < self.w1:
            tokens = rng.randint(self.tmin, self.tmax)
            prompt = (
                f"bench {self.first + index}-{n} sim:tokens={tokens} sim:rate={self.rate} "
                "sim:delay=0"
            )
            n += 1
            try:
                self.one_stream(prompt, tokens)
            except StreamFailed as exc:
                self.error(str(exc))
                gevent.sleep(0.1)
            except (OSError, EOFError) as exc:
                self.error(type(exc).__name__)
                gevent.sleep(0.1)
            except gevent.Timeout:
                self.error("timeout")

    def one_stream(self, prompt: str, tokens: int) -> None:
        import gevent

        kind, (_, marker, end_marker) = self.kind, KINDS[self.kind]
        perf = time.perf_counter
        w0, w1 = self.w0, self.w1
        t_start = perf()
        if w0 <= t_start < w1:
            self.started += 1
        sock = watcher = None
        hub = self.hub
        events = in_window = 0  # token frames received, and those inside the window
        first_in_window = False
        try:
            with gevent.Timeout(STREAM_TIMEOUT):
                try:
                    sock = self.socket.socket(_stdsocket.AF_INET, _stdsocket.SOCK_STREAM)
                    sock.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
                    sock.connect((self.host, self.port))
                    sock.sendall(request_bytes(kind, self.host, self.port, prompt))
                    # Wait, then receive, on the plain non-blocking socket: no EAGAIN
                    # exception per receive as gevent's recv() has (frames come one by one).
                    raw = sock._sock
                    recv = raw.recv
                    watcher = hub.loop.io(raw.fileno(), 1)
                    buf = b""
                    while (end := buf.find(b"\r\n\r\n")) < 0:
                        hub.wait(watcher)
                        try:
                            data = recv(65536)
                        except BlockingIOError:
                            continue
                        if not data:
                            raise StreamFailed("closed before the response head")
                        buf += data
                    now = perf()
                    if w0 <= now < w1:
                        self.head.append(now - t_start)
                    if not buf.startswith(b"HTTP/1.1 200"):
                        raise StreamFailed(f"HTTP {buf[9:12].decode(errors='replace')}")
                    buf = buf[end + 4 :]
                    last = None
                    while True:
                        cut = buf.rfind(b"\n\n")
                        if cut >= 0:
                            block, buf = buf[: cut + 2], buf[cut + 2 :]
                            if n := block.count(marker):
                                events += n
                                inside = w0 <= now < w1
                                if last is None:
                                    if inside:
                                        self.ttft.append(now - t_start)
                                        first_in_window = True
                                elif inside:
                                    gap = now - last
                                    self.gaps.add(gap)
                                    if gap > self.gap_max:
                                        self.gap_max = gap
                                if inside:
                                    in_window += n
                                    if n > 1:  # frames that came in the same receive
                                        self.gaps.add(0.0, n - 1)
                                last = now
                            if end_marker in block:
                                break
                        hub.wait(watcher)
                        try:
                            data = recv(65536)
                        except BlockingIOError:
                            continue
                        now = perf()
                        if not data:
                            raise StreamFailed("closed before the end")
                        buf += data
                finally:
                    if watcher is not None:
                        watcher.close()
                    if sock is not None:
                        sock.close()
            got = events
            if kind == "sluice":
                at = block.rindex(b"event: done")
                line = block[block.index(b"data: ", at) + 6 :].split(b"\n", 1)[0]
                done = json.loads(line)
                if done["reason"] != "stop":
                    raise StreamFailed(f"done reason {done['reason']}")
                got = done["metadata"]["token_count"]
                if first_in_window and done["metadata"]["ttft_ms"] is not None:
                    self.server_ttft.append(done["metadata"]["ttft_ms"] / 1000)
            elif kind == "common" and b'"type": "error"' in block:
                raise StreamFailed("error event")
            if got != tokens:
                raise StreamFailed(f"{got} tokens of {tokens}")
        except BaseException:
            self.tokens += in_window  # a frame is at least one token
            self.token_events += in_window
            raise
        # Tokens inside the window: the stream's token count shared out over its frames
        # (Sluice may join several deltas in one frame; direct: one token per frame).
        self.tokens += got * in_window / events if events else 0
        self.token_events += in_window
        if w0 <= now < w1:
            self.completed += 1

    def run(self) -> dict:
        import gevent

        users = [gevent.spawn(self.user, i) for i in range(self.streams)]
        if self.burst:
            cpu0 = _cpu()
            left = gevent.joinall(users, timeout=STREAM_TIMEOUT + 5)
            self.cpu_window = _cpu() - cpu0
            self.w0 = self.t0
            self.w1 = max(self.ends) if self.ends else self.t0 + STREAM_TIMEOUT
        else:
            gevent.sleep(max(0.0, self.w0 - time.perf_counter()))
            cpu0 = _cpu()
            gevent.sleep(max(0.0, self.w1 - time.perf_counter()))
            self.cpu_window = _cpu() - cpu0
            left = gevent.joinall(users, timeout=DRAIN)
        unfinished = len(users) - len(left)
        gevent.killall(users, block=True, timeout=5)
        return {
            "kind": self.kind,
            "streams": self.streams,
            "rate": self.rate,
            "tokens_range": [self.tmin, self.tmax],
            "window_s": self.w1 - self.w0,
            "ttft_s": self.ttft,
            "head_s": self.head,
            "server_ttft_s": self.server_ttft,
            "gaps": self.gaps.to_json(),
            "gap_max_s": self.gap_max,
            "tokens": self.tokens,
            "token_events": self.token_events,
            "completed": self.completed,
            "started": self.started,
            "first_tokens": len(self.ttft),
            "errors": self.errors,
            "unfinished_at_drain": unfinished,
            "cpu_window_s": self.cpu_window,
        }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def merge(parts: list[dict]) -> dict:
    """Combine the JSON of several generator processes run at the same time."""
    merged = dict(parts[0])
    gaps = Hist()
    merged["ttft_s"], merged["head_s"], merged["server_ttft_s"], merged["errors"] = [], [], [], {}
    for key in ("streams", "tokens", "token_events", "completed", "started", "first_tokens"):
        merged[key] = sum(p[key] for p in parts)
    merged["unfinished_at_drain"] = sum(p["unfinished_at_drain"] for p in parts)
    merged["cpu_window_s"] = sum(p["cpu_window_s"] for p in parts)
    merged["gap_max_s"] = max(p["gap_max_s"] for p in parts)
    for p in parts:
        merged["ttft_s"] += p["ttft_s"]
        merged["head_s"] += p["head_s"]
        merged["server_ttft_s"] += p["server_ttft_s"]
        gaps.merge(Hist.from_json(p["gaps"]))
        for what, n in p["errors"].items():
            merged["errors"][what] = merged["errors"].get(what, 0) + n
    merged["gaps"] = gaps.to_json()
    merged["processes"] = len(parts)
    return merged


def summarize(raw: dict) -> dict:
    """The reported figures of a (merged) run."""
    from bench.stack import pct

    ttft_ms = [t * 1000 for t in raw["ttft_s"]]
    gaps = Hist.from_json(raw["gaps"])
    window = raw["window_s"]
    return {
        "kind": raw["kind"],
        "streams": raw["streams"],
        "offered_tps": raw["streams"] * raw["rate"],
        "delivered_tps": raw["tokens"] / window,
        "ttft_p50_ms": pct(ttft_ms, 50),
        "ttft_p99_ms": pct(ttft_ms, 99),
        "head_p50_ms": pct([t * 1000 for t in raw["head_s"]], 50),
        "server_ttft_p50_ms": pct([t * 1000 for t in raw["server_ttft_s"]], 50),
        "gap_p50_ms": gaps.pct_ms(50),
        "gap_p99_ms": gaps.pct_ms(99),
        "gap_max_ms": raw["gap_max_s"] * 1000,
        "completed": raw["completed"],
        "started": raw["started"],
        "errors": sum(raw["errors"].values()),
        "error_kinds": raw["errors"],
        "unfinished": raw["unfinished_at_drain"],
        "loadgen_cpu_cores": raw["cpu_window_s"] / window,
        "loadgen_us_per_event": (
            raw["cpu_window_s"] / raw["token_events"] * 1e6 if raw["token_events"] else math.nan
        ),
        "processes": raw.get("processes", 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT (loopback only)")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--rate", type=int, default=50, help="tokens/s per stream")
    parser.add_argument("--tokens", default="100-200", help="tokens per stream, MIN-MAX")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="epoch time to begin")
    parser.add_argument("--first-stream", type=int, default=0, help="seed offset (processes)")
    parser.add_argument("--summary", action="store_true", help="print the summary, not raw")
    parser.add_argument(
        "--burst", action="store_true", help="one stream per user, all started at --start-at"
    )
    args = parser.parse_args(argv)
    host = urlsplit(args.url).hostname
    if host not in ("127.0.0.1", "localhost"):
        parser.error("only 127.0.0.1 is a valid target")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    raw = Generator(args).run()
    out = summarize(raw) if args.summary else raw
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
