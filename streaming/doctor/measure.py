"""Calling the probe stream and timing what arrives: no verdict here (see `verdict`).

One GET of ``BASE_URL/api/v1/diagnostics/stream[?idle=S]`` with httpx (the
runtime's httpx2, whose client honours ``HTTPS_PROXY``, ``HTTP_PROXY``,
``ALL_PROXY`` and ``NO_PROXY`` by default, like any httpx client), sending what
a browser's EventSource sends (``Accept: text/event-stream``, the usual
``Accept-Encoding``), following redirects. Every body chunk is stamped with
the monotonic clock when it is read, and each SSE frame in it (a probe, a
``: ping`` comment, ``done``) gets that stamp, so the probes' arrivals can be
compared with their ``sent_at`` and with each other.

`Unreachable` is raised when the test cannot run at all: no HTTP answer
(refused, DNS, TLS, a proxy refusing, no answer head in time), or an answer
that is not the probe stream (any status but 200, or not
``text/event-stream``). Everything after the head is a `Measurement`, also a
stream that was cut or stalled.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx2

__all__ = ["PATH", "Frame", "Measurement", "Unreachable", "measure", "probe_url"]

PATH = "/api/v1/diagnostics/stream"
PROBE_SPAN = 3.0  # the server sends probes over 3 s (streaming.web.diagnostics)
CONNECT_TIMEOUT = 10.0
STALL_MARGIN = 30.0  # no byte for PROBE_SPAN + idle + this long: stalled
USER_AGENT = "sluice-doctor/1"


class Unreachable(Exception):
    """The probe stream could not be obtained; the message says why (for an operator)."""


@dataclass
class Frame:
    kind: str  # "probe", "done", "ping" (a comment), or another event's name
    at: float  # seconds after the request was sent, when its chunk was read
    data: dict = field(default_factory=dict)


@dataclass
class Measurement:
    url: str
    idle: float
    status: int = 0
    http_version: str = ""
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    started_epoch: float = 0.0  # our clock when the request was sent
    head_at: float | None = None  # seconds after the request: the answer's head
    first_byte_at: float | None = None  # the first body byte
    last_byte_at: float | None = None
    frames: list[Frame] = field(default_factory=list)
    ended: str = ""  # "done", "eof" (closed without done), "error", "stalled"
    error: str = ""  # what ended it, when not "done"
    ended_at: float | None = None

    def of(self, kind: str) -> list[Frame]:
        return [f for f in self.frames if f.kind == kind]

    @property
    def done(self) -> Frame | None:
        found = self.of("done")
        return found[0] if found else None

    def to_json(self) -> dict:
        return {
            "url": self.url,
            "idle": self.idle,
            "status": self.status,
            "http_version": self.http_version,
            "headers": self.headers,
            "head_s": self.head_at,
            "first_byte_s": self.first_byte_at,
            "ended": self.ended,
            "error": self.error,
            "ended_s": self.ended_at,
            "frames": [{"kind": f.kind, "at_s": round(f.at, 4), **f.data} for f in self.frames],
        }


def probe_url(base_url: str, idle: float) -> str:
    if "://" not in base_url:
        raise Unreachable(f"{base_url!r} is not a URL: give the scheme, e.g. https://{base_url}")
    root = base_url.split("?", 1)[0].rstrip("/")
    url = root if root.endswith(PATH) else root + PATH  # the probe's own URL given: fine
    idle = round(idle, 3)  # the server takes up to three decimals
    return f"{url}?{urlencode({'idle': f'{idle:g}'})}" if idle else url


class _Reader:
    """Incremental text/event-stream reader that keeps each frame's arrival time."""

    def __init__(self, m: Measurement):
        self.m = m
        self.buf = b""
        self.event = ""
        self.data: list[str] = []

    def feed(self, chunk: bytes, at: float) -> None:
        lines = (self.buf + chunk).split(b"\n")
        self.buf = lines.pop()
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                self._dispatch(at)
            elif line.startswith(":"):
                self.m.frames.append(Frame("ping", at, {"comment": line[1:].strip()}))
            else:
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    self.event = value
                elif name == "data":
                    self.data.append(value)

    def _dispatch(self, at: float) -> None:
        if self.data:
            try:
                data = json.loads("\n".join(self.data))
            except ValueError:
                data = {}
            if not isinstance(data, dict):
                data = {}
            self.m.frames.append(Frame(self.event or "message", at, data))
        self.event, self.data = "", []


def measure(base_url: str, idle: float = 0.0, *, verify: bool = True) -> Measurement:
    """Run the probe stream through whatever stands between us and `base_url`."""
    idle = round(idle, 3)  # as the server takes it
    url = probe_url(base_url, idle)
    m = Measurement(url=url, idle=idle)
    stall = PROBE_SPAN + idle + STALL_MARGIN
    timeout = httpx2.Timeout(CONNECT_TIMEOUT, read=stall)
    headers = {
        "Accept": "text/event-stream",
        "Cache-Control": "no-cache",
        "User-Agent": USER_AGENT,
    }
    try:
        client = httpx2.Client(
            timeout=timeout, headers=headers, follow_redirects=True, verify=verify, http2=_h2()
        )
    except (ValueError, OSError) as exc:  # e.g. a malformed proxy variable
        raise Unreachable(f"cannot set up the HTTP client: {exc}") from exc
    with client:
        start = time.monotonic()
        m.started_epoch = time.time()
        try:
            with client.stream("GET", url) as response:
                m.head_at = time.monotonic() - start
                m.status = response.status_code
                m.http_version = response.http_version
                m.url = str(response.url)
                m.headers = {k.lower(): v for k, v in response.headers.items()}
                _check_answer(response, m)
                _read_body(response, m, start, stall)
        except httpx2.InvalidURL as exc:
            raise Unreachable(f"invalid URL {url}: {exc}") from exc
        except httpx2.TooManyRedirects as exc:
            raise Unreachable(f"too many redirects from {url}") from exc
        except httpx2.TransportError as exc:  # before the head: _read_body keeps the rest
            raise Unreachable(_transport_reason(exc, url)) from exc
    return m


def _h2() -> bool:
    try:
        import h2  # noqa: F401  (HTTP/2 as browsers use it, when the h2 package is there)
    except ImportError:
        return False
    return True


def _check_answer(response: httpx2.Response, m: Measurement) -> None:
    ctype = m.headers.get("content-type", "")
    if m.status == 200 and ctype.split(";")[0].strip().lower() == "text/event-stream":
        return
    try:
        body = response.read()[:300].decode("utf-8", "replace")
    except httpx2.HTTPError:
        body = ""
    detail = ""
    try:
        error = json.loads(body)["error"]
        detail = f": {error['code']} ({error['message']})"
    except (ValueError, KeyError, TypeError):
        if body.strip():
            detail = ": " + " ".join(body.split())[:120]
    if m.status == 429:
        retry = m.headers.get("retry-after")
        hint = f"; retry in {retry} s" if retry else ""
        raise Unreachable(f"HTTP 429 from {m.url}: rate limited{hint}{detail}")
    if m.status == 404:
        raise Unreachable(
            f"HTTP 404 from {m.url}: no probe stream there (is BASE_URL the deployment's root, "
            f"and does it run a Sluice with GET {PATH}?){detail}"
        )
    if m.status != 200:
        raise Unreachable(f"HTTP {m.status} from {m.url}{detail}")
    raise Unreachable(
        f"{m.url} answered 200 with Content-Type {ctype or '(none)'}, not the probe's "
        f"text/event-stream (a login page, a proxy's block page, or not Sluice?){detail}"
    )


def _read_body(response: httpx2.Response, m: Measurement, start: float, stall: float) -> None:
    reader = _Reader(m)
    deadline = start + stall + PROBE_SPAN + m.idle  # the stream ends well before this
    try:
        for chunk in response.iter_bytes():
            at = time.monotonic() - start
            if m.first_byte_at is None:
                m.first_byte_at = at
            m.last_byte_at = at
            reader.feed(chunk, at)
            if m.done is not None:
                m.ended = "done"
                break
            if (error := _server_error(m)) is not None:  # e.g. Sluice restarting
                m.ended, m.error = "error", error
                break
            if at + start > deadline:
                m.ended, m.error = "stalled", f"no done after {at:.0f} s"
                break
        else:
            m.ended, m.error = "eof", "the connection was closed before done"
    except httpx2.ReadTimeout:
        m.ended, m.error = "stalled", f"no byte for {stall:.0f} s"
    except httpx2.HTTPError as exc:  # reset, incomplete chunked body, bad gzip...
        m.ended, m.error = "error", f"{type(exc).__name__}: {exc}".rstrip(": ")
    m.ended_at = time.monotonic() - start


def _server_error(m: Measurement) -> str | None:
    """The message of an ``event: error`` the server sent (it ends the probe stream)."""
    for frame in reversed(m.frames):
        if frame.kind == "error":
            error = frame.data.get("error") or {}
            return f"the server said: {error.get('code', 'error')} ({error.get('message', '')})"
    return None


def _transport_reason(exc: httpx2.TransportError, url: str) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx2.ConnectTimeout):
        return f"no connection to {url} within {CONNECT_TIMEOUT:g} s ({text})"
    if isinstance(exc, httpx2.ReadTimeout):
        return f"{url} accepted the connection but sent no answer head ({text})"
    if isinstance(exc, httpx2.ProxyError):
        return f"the proxy refused or failed the request for {url} ({text})"
    if isinstance(exc, httpx2.UnsupportedProtocol):
        return f"unsupported URL scheme in {url}: use http:// or https:// ({text})"
    lowered = text.lower()
    if "certificate" in lowered or "ssl" in lowered or "tls" in lowered:
        return f"TLS failed for {url} ({text}); --insecure skips the certificate check"
    if "name or service" in lowered or "nodename" in lowered or "resolution" in lowered:
        return f"the host name of {url} does not resolve ({text})"
    if "refused" in lowered:
        return f"connection refused by {url} ({text})"
    return f"cannot reach {url} ({type(exc).__name__}: {text})"
