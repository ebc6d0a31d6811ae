"""The doctor's rules: a `Measurement` in, a verdict (and exit status) out. Pure functions.

Held back. Each probe carries ``sent_at`` (the server's clock); we stamp its
arrival (ours). The clocks need not agree: what counts is each probe's delay
*relative to the least delayed one*, ``hold = (arrival - sent_at) -
min(arrival - sent_at)``, which is the same as comparing the arrival spacing
with the send spacing. Probes leave 250 ms apart over 3 s; a proxy that
buffers the stream releases them in one burst when its buffer fills or the
response ends, so the first probe is held about 3 s longer than the last.
The verdict is "held back" when any probe is held `HOLD_LIMIT` (1 s, four
probe intervals) or more: scheduling jitter on a loaded machine is tens of
milliseconds, a buffer's hold is seconds. Holds of `JITTER_NOTE` (0.5 s) or
more, below the limit, are reported but do not fail.

Idle (``--idle S``). The server pings every ``ping_interval`` seconds (it says
so in every probe) during the silence, then sends ``done``. The connection
survived when ``done`` arrived; the pings came through when the longest
silence we saw between the last probe and ``done`` is at most the ping
interval plus `ping_slack` (a ping held back or stripped makes that silence
the whole idle period). A connection closed or reset before ``done`` is cut.

Culprits come from the response's headers (and how the request reached
Sluice, which the first probe reports): an added ``Content-Length`` (the
whole response was read before it was passed on), ``Content-Encoding``
(compression: Sluice never compresses), CDN markers, ``Via``, cache headers,
a ``Server`` that is not gunicorn, Sluice's ``X-Accel-Buffering: no`` hint
missing, HTTP/1.0 on either side.

Exit status: 0 events arrive as sent (and, with ``--idle``, the connection and
its pings survive the silence); 1 held back, cut, or pings lost; 2 (decided in
`streaming.doctor.__main__`) the probe stream could not be obtained at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from streaming.doctor.measure import Measurement

__all__ = [
    "HOLD_LIMIT",
    "JITTER_NOTE",
    "Diagnosis",
    "Suspect",
    "diagnose",
    "find_suspects",
    "ping_slack",
    "timeout_suspects",
]

HOLD_LIMIT = 1.0
JITTER_NOTE = 0.5
PROBES = 13
DOCS = 'docs/DEPLOY.md, "Is something buffering my streams?"'

# (header, substring of its value or "" for any value, who) -- first match wins per CDN
_CDNS: list[tuple[str, str, str]] = [
    ("cf-ray", "", "Cloudflare"),
    ("server", "cloudflare", "Cloudflare"),
    ("x-amz-cf-id", "", "Amazon CloudFront"),
    ("via", "cloudfront", "Amazon CloudFront"),
    ("x-fastly-request-id", "", "Fastly"),
    ("x-served-by", "cache-", "Fastly"),
    ("server", "akamai", "Akamai"),
    ("x-akamai-transformed", "", "Akamai"),
    ("x-azure-ref", "", "Azure Front Door"),
    ("x-vercel-id", "", "Vercel"),
    ("x-nf-request-id", "", "Netlify"),
    ("server", "netlify", "Netlify"),
    ("via", "google", "Google Cloud load balancing"),
    ("x-goog-", "", "Google Cloud"),
    ("fly-request-id", "", "Fly.io"),
    ("x-envoy-upstream-service-time", "", "Envoy (a service mesh or gateway)"),
]


@dataclass
class Suspect:
    key: str
    evidence: str  # what the response showed
    fix: str  # where to look


@dataclass
class Diagnosis:
    status: int  # 0 or 1 (2 never reaches here)
    verdict: str
    facts: list[str] = field(default_factory=list)
    suspects: list[Suspect] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    held_s: float | None = None
    probes: int = 0
    idle: dict | None = None

    def to_json(self) -> dict:
        return {
            "exit_status": self.status,
            "verdict": self.verdict,
            "held_back_s": self.held_s,
            "probes_received": self.probes,
            "idle": self.idle,
            "suspects": [s.__dict__ for s in self.suspects],
            "facts": self.facts,
            "notes": self.notes,
        }


def ping_slack(interval: float) -> float:
    return max(1.0, interval / 2)


def diagnose(m: Measurement) -> Diagnosis:
    probes = m.of("probe")
    d = Diagnosis(status=0, verdict="", probes=len(probes))
    d.facts.append(_line_head(m))
    d.facts.append(_line_headers(m))
    suspects = find_suspects(m)

    held = None
    if len(probes) >= 2:
        delays = [m.started_epoch + p.at - float(p.data.get("sent_at", 0)) for p in probes]
        base = min(delays)
        holds = [x - base for x in delays]
        held = max(holds)
        d.held_s = round(held, 3)
        sent = [float(p.data.get("sent_at", 0)) for p in probes]
        sent_span = sent[-1] - sent[0]
        arrived_span = probes[-1].at - probes[0].at
        d.facts.append(
            f"probes: {len(probes)} of {PROBES}; sent over {sent_span:.2f} s, arrived over "
            f"{arrived_span:.2f} s; held back up to {held:.2f} s (limit {HOLD_LIMIT:g} s)"
        )
        d.facts.append(_clock_line(base))
    elif probes:
        d.facts.append(f"probes: 1 of {PROBES}")
    else:
        d.facts.append(f"probes: none of {PROBES} arrived")

    idle_ok, idle_line = _idle(m, d)
    if idle_line:
        d.facts.append(idle_line)

    cut = m.ended != "done"
    if held is not None and held >= HOLD_LIMIT:
        d.status = 1
        burst = sum(1 for p in probes if probes[-1].at - p.at < 0.1)
        d.verdict = (
            f"HELD BACK: events were held back up to {held:.1f} s; {burst} of {len(probes)} "
            "probes arrived together in one burst. Something between this machine and Sluice "
            "buffers event streams."
        )
        d.suspects = suspects
    elif cut:
        d.status = 1
        d.verdict = f"CUT: the stream ended before its last event ({m.error or m.ended})."
        if m.idle and len(probes) == PROBES:
            silent = (m.ended_at or 0) - (m.last_byte_at or 0)
            d.verdict = (
                f"CUT: the connection was cut during the {m.idle:g} s silence, "
                f"{silent:.1f} s after the last byte ({m.error or m.ended}). Something between "
                "closes quiet connections sooner than the ping interval: raise its idle/read "
                "timeout above HEARTBEAT_SECONDS."
            )
        d.suspects = timeout_suspects(m)
    elif not idle_ok:
        d.status = 1
        d.verdict = (
            "PINGS LOST: the connection survived the silence but the `: ping` comments did not "
            "arrive as sent (held back or stripped); a browser sees a silent connection."
        )
        d.suspects = timeout_suspects(m)
    else:
        d.verdict = "OK: events arrive as sent" + (
            f", and the connection survives {m.idle:g} s of silence." if m.idle else "."
        )
        if held is not None and held >= JITTER_NOTE:
            d.notes.append(
                f"some probes were delayed up to {held:.2f} s (below the {HOLD_LIMIT:g} s limit): "
                "a busy network or machine, or a proxy flushing on a timer; run it again."
            )
        d.notes.extend(f"{s.evidence}. Fix: {s.fix}" for s in suspects if s.key in _WORTH_NOTING)
    return d


_WORTH_NOTING = {"compression", "backend-http/1.0", "http/1.0", "whole-response"}


def _line_head(m: Measurement) -> str:
    first = f"{m.first_byte_at:.3f} s" if m.first_byte_at is not None else "never"
    return (
        f"{m.http_version} {m.status}; answer head after {m.head_at or 0:.3f} s, "
        f"first body byte after {first}"
    )


def _line_headers(m: Measurement) -> str:
    h = m.headers
    shown = [
        f"Server: {h.get('server', '(none)')}",
        f"Content-Encoding: {h.get('content-encoding', '(none)')}",
        f"X-Accel-Buffering: {h.get('x-accel-buffering', '(absent)')}",
    ]
    for name in ("via", "content-length", "x-cache", "cf-ray"):
        if name in h:
            shown.append(f"{_title(name)}: {h[name]}")
    return "response: " + "; ".join(shown)


def _clock_line(base: float) -> str:
    if -0.5 < base < 2.0:
        return (
            f"clocks: the least delayed probe arrived {base * 1000:.0f} ms after its sent_at "
            "(meaningful only if both clocks agree; the verdict does not rely on it)"
        )
    return (
        f"clocks: our clock and the server's differ by about {base:.1f} s; "
        "only relative timings were used"
    )


def _idle(m: Measurement, d: Diagnosis) -> tuple[bool, str]:
    if not m.idle:
        return True, ""
    probes = m.of("probe")
    interval = float(probes[0].data.get("ping_interval") or 0) if probes else 0.0
    last_probe = next((p for p in probes if p.data.get("seq") == PROBES), None)
    if last_probe is None:
        d.idle = {"seconds": m.idle, "survived": False, "reached": False}
        return False, f"idle {m.idle:g} s: not reached (the probes did not all arrive)"
    pings = [f for f in m.of("ping") if f.at >= last_probe.at]
    done = m.done
    end = done.at if done else (m.ended_at or last_probe.at)
    marks = [last_probe.at, *(p.at for p in pings), end]
    longest = max(b - a for a, b in zip(marks, marks[1:], strict=False))
    sent = int(done.data.get("pings", 0)) if done else None
    ok = done is not None and longest <= interval + ping_slack(interval)
    d.idle = {
        "seconds": m.idle,
        "survived": done is not None,
        "ping_interval_s": interval,
        "pings_received": len(pings),
        "pings_sent": sent,
        "longest_silence_s": round(longest, 3),
    }
    if done is None:
        return False, (
            f"idle {m.idle:g} s: CUT after {end - last_probe.at:.1f} s of it; "
            f"{len(pings)} ping(s) arrived first (pings every {interval:g} s)"
        )
    return ok, (
        f"idle {m.idle:g} s: survived; {len(pings)} of {sent} pings arrived, longest silence "
        f"{longest:.1f} s (pings every {interval:g} s, allowed "
        f"{interval + ping_slack(interval):.1f} s)"
    )


def _title(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))


def find_suspects(m: Measurement) -> list[Suspect]:
    """What the response's headers (and the first probe's `server`) say stands in between,
    likeliest culprit first."""
    h = m.headers
    found: list[Suspect] = []
    if "content-length" in h:
        found.append(
            Suspect(
                "whole-response",
                f"Content-Length: {h['content-length']} on an event stream: something in "
                "between read the whole response before passing it on",
                "a buffering proxy or cache",
            )
        )
    encoding = h.get("content-encoding", "").strip().lower()
    if encoding and encoding != "identity":
        found.append(
            Suspect(
                "compression",
                f"compression: Content-Encoding: {encoding} was added in between (Sluice never "
                "compresses); a compressor holds events back until its buffer fills unless it "
                "flushes on every write (nginx's gzip does when proxy buffering is off; many "
                "CDNs and proxies do not)",
                "exclude text/event-stream from compression (nginx: gzip_types without it; "
                "CDNs: a no-compression rule for the path)",
            )
        )
    probes = m.of("probe")
    server_info = probes[0].data.get("server") if probes else None
    if isinstance(server_info, dict) and server_info.get("protocol") == "HTTP/1.0":
        found.append(
            Suspect(
                "backend-http/1.0",
                "the proxy in front of Sluice talks HTTP/1.0 to it (nginx's default "
                "proxy_http_version): with buffering on, nginx holds such an unchunked response "
                "in its buffers until it ends",
                "nginx: proxy_http_version 1.1 and proxy_buffering off for the stream paths, "
                "as in the bundled nginx.conf",
            )
        )
    cdns: list[str] = []
    for name, needle, who in _CDNS:
        prefix = name.endswith("-")
        values = [v for k, v in h.items() if k == name or (prefix and k.startswith(name))]
        if any(needle in v.lower() for v in values) and who not in cdns:
            cdns.append(who)
    for who in cdns:
        found.append(
            Suspect(
                "cdn",
                f"a CDN: {who} (from its response headers)",
                "make the CDN pass the stream paths through unbuffered and uncached",
            )
        )
    if "via" in h:
        found.append(
            Suspect(
                "proxy",
                f"a proxy announced itself: Via: {h['via']}",
                "a forward or reverse proxy; bypass it (NO_PROXY) or have it stream "
                "text/event-stream",
            )
        )
    cache = [f"{_title(k)}: {h[k]}" for k in ("x-cache", "x-cache-status", "age") if k in h]
    if cache:
        found.append(
            Suspect(
                "cache",
                "a cache in between: " + "; ".join(cache),
                "exclude the stream paths from caching",
            )
        )
    server = h.get("server", "")
    if server and "gunicorn" not in server.lower() and not cdns:
        hint = (
            "nginx: proxy_buffering on for this path with X-Accel-Buffering ignored "
            "(proxy_ignore_headers) or not reaching it; use the bundled nginx.conf's stream "
            "locations (proxy_buffering off; gzip off)"
            if "nginx" in server.lower()
            else "check that proxy's response buffering for text/event-stream"
        )
        found.append(Suspect("reverse-proxy", f"a reverse proxy answered (Server: {server})", hint))
    if "x-accel-buffering" not in h:
        found.append(
            Suspect(
                "accel-hint",
                "Sluice's `X-Accel-Buffering: no` did not come through: a proxy in between "
                "consumed or removed it (nginx consumes it and obeys it unless "
                "proxy_ignore_headers X-Accel-Buffering is set)",
                "turn buffering off for the stream paths explicitly",
            )
        )
    if m.http_version == "HTTP/1.0":
        found.append(
            Suspect(
                "http/1.0",
                "the answer came over HTTP/1.0 (no chunked encoding): an old or down-grading proxy",
                "HTTP/1.1 or HTTP/2 end to end",
            )
        )
    return found


def timeout_suspects(m: Measurement) -> list[Suspect]:
    """Who may have cut a quiet connection (or dropped its pings): the hops the headers show."""
    h = m.headers
    found: list[Suspect] = []
    for s in find_suspects(m):
        if s.key == "cdn":
            found.append(
                Suspect(
                    "cdn",
                    s.evidence,
                    "the CDN's idle / origin read timeout must exceed HEARTBEAT_SECONDS "
                    "(Cloudflare's default is 100 s)",
                )
            )
        elif s.key == "proxy":
            found.append(Suspect("proxy", s.evidence, "that proxy's idle or read timeout"))
    server = h.get("server", "")
    if server and "gunicorn" not in server.lower():
        hint = (
            "nginx: proxy_read_timeout (and send_timeout) above HEARTBEAT_SECONDS, as in the "
            "bundled nginx.conf (60 s)"
            if "nginx" in server.lower()
            else "its idle / read timeout must exceed HEARTBEAT_SECONDS"
        )
        found.append(Suspect("reverse-proxy", f"a reverse proxy answered (Server: {server})", hint))
    found.append(
        Suspect(
            "idle-timeout",
            "any load balancer or firewall in between that drops idle connections",
            "its idle timeout must exceed HEARTBEAT_SECONDS (AWS ALB: 60 s by default)",
        )
    )
    return found
