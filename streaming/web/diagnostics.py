"""GET /api/v1/diagnostics/stream: the probe stream that `streaming.doctor` measures.

No credential is needed, also in authenticated mode (API.md §12): the
blueprint has no `views.authenticated` hook. It is rate limited with
``RATE_LIMIT_DEFAULT``, always per client IP (there is no owner to count
against), sharing the budget of the other /api routes.

The stream (SSE headers of every stream; no Redis, no generation):

- ``event: probe`` frames (ids 1..13), one every 250 ms for 3 s, each with the
  server's send time ``sent_at`` (epoch seconds, a float), ``seq`` and ``of``;
  the first also says how the request reached Sluice (``server.protocol``: a
  proxy in front speaking HTTP/1.0 to it shows here; ``server.forwarded``: how
  many ``X-Forwarded-For`` hops it carried), for the doctor's culprit hints.
- with ``?idle=S`` (0 <= S <= 120; anything else is ``400 invalid_request``
  naming ``idle``): silence but for ``: ping`` comments for S seconds. The
  silence is cut into k = max(3, ceil(S / HEARTBEAT_SECONDS)) equal intervals;
  a ping ends each but the last, so pings come every S/k seconds, which is
  min(HEARTBEAT_SECONDS, S/3) or just under it: at least two pings cross every
  idle period, and with S >= 3 x HEARTBEAT_SECONDS they come exactly as often
  as on a real stream (so a proxy timeout that would cut real streams cuts this).
- a worker shutdown (reload, stop) ends an open probe stream at once with
  ``event: error`` (id 14, ``interrupted``) and no ``done``
  (`end_probe_streams`, called by config/gunicorn.conf.py).
- ``event: done`` (id 14): ``{"type": "done", "finished": true, "probes",
  "pings", "idle", "sent_at"}``.

Waiting never blocks the worker: the body sleeps on a libev timer and on the
client socket watch (`streaming.core.follow.ClientWatch`), so a client that
goes away ends the body within milliseconds, even during a long silence
(`close()`, which gunicorn always calls, releases the timer and the watch).

The page's own burst detector, ``static/arrival.js`` (see its header), is
served with the page's other files by `streaming.web.ops`; it points people at
the doctor.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator

from flask import Blueprint, Response, request
from gevent import get_hub

from streaming.core.follow import Body, ClientWatch
from streaming.sse import PING, encode_json
from streaming.web.context import sluice
from streaming.web.errors import ApiError
from streaming.web.limits import client_ip, limiter
from streaming.web.views import SSE_HEADERS, client_watch

__all__ = [
    "MAX_IDLE",
    "PROBES",
    "PROBE_INTERVAL",
    "bp",
    "end_probe_streams",
    "idle_schedule",
    "probe_stream",
]

PROBES = 13  # at 0, 0.25, ..., 3.0 s
PROBE_INTERVAL = 0.25
MAX_IDLE = 120.0
_IDLE = re.compile(r"\d{1,3}(\.\d{1,3})?")

bp = Blueprint("diagnostics", __name__)
# Per client IP even in authenticated mode (no credential here), in the /api budget.
_limit = limiter.shared_limit(
    lambda: sluice().settings.rate_limit_default, scope="api", key_func=client_ip
)


def idle_schedule(idle: float, heartbeat: float) -> tuple[int, float]:
    """(pings, interval) for a silence of `idle` seconds: k equal intervals, a ping ending all but
    the last, k = max(3, ceil(idle / heartbeat)); (0, 0.0) without a silence."""
    if idle <= 0:
        return 0, 0.0
    k = max(3, math.ceil(idle / heartbeat - 1e-9))
    return k - 1, idle / k


def _idle_arg() -> float:
    raw = request.args.get("idle", "0")
    if not _IDLE.fullmatch(raw) or float(raw) > MAX_IDLE:
        raise ApiError(
            400,
            "invalid_request",
            f"Invalid field 'idle': a number of seconds from 0 to {MAX_IDLE:g}.",
        )
    return float(raw)


class _Open:
    """This worker's open probe streams, so that a worker shutdown ends them at once
    (they are not generations: `StreamManager.shutdown` does not know them)."""

    def __init__(self) -> None:
        self.watches: set[ClientWatch] = set()
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        for watch in list(self.watches):
            watch.wake.set()


_OPEN = _Open()


def end_probe_streams() -> None:
    """Worker shutdown (config/gunicorn.conf.py): every open probe stream ends now with an
    ``interrupted`` error, instead of holding the worker for its idle period."""
    _OPEN.stop()


def _pause(until: float, watch: ClientWatch) -> None:
    """Sleep until monotonic time `until`, or until the client goes away.

    The watch's wake event is also set by the client socket's own events, so a
    wake-up before `until` with the client still there sleeps again.
    """
    wake = watch.wake
    while not watch.gone and not _OPEN.stopping:
        delay = until - time.monotonic()
        if delay <= 0:
            return
        wake.clear()
        timer = get_hub().loop.timer(delay)
        timer.start(wake.set)
        try:
            wake.wait()
        finally:
            timer.stop()
            timer.close()


def probe_stream(idle: float, heartbeat: float, watch: ClientWatch, server: dict) -> Body:
    """The response body: probes, the optional silence with its pings, then `done`.

    A `Body`, so the watch is closed even when the body is never iterated.
    """
    _OPEN.watches.add(watch)

    def close() -> None:
        _OPEN.watches.discard(watch)
        watch.close()

    return Body(_frames(idle, heartbeat, watch, server), close)


# A worker shutdown ends an open probe stream with this (and no ``done``): the doctor
# then says the connection was cut, and why.
_INTERRUPTED = encode_json(
    {
        "type": "error",
        "error": {"code": "interrupted", "message": "The server is restarting."},
    },
    event="error",
    id=PROBES + 1,  # in place of done
)


def _frames(idle: float, heartbeat: float, watch: ClientWatch, server: dict) -> Iterator[bytes]:
    for due, frame in _schedule(idle, heartbeat, server):
        _pause(due, watch)
        if watch.gone:
            return
        if _OPEN.stopping:
            yield _INTERRUPTED
            return
        yield frame()


def _schedule(
    idle: float, heartbeat: float, server: dict
) -> Iterator[tuple[float, Callable[[], bytes]]]:
    """(when, the frame) for each frame in turn: when is a `time.monotonic()` deadline; the
    frame is made when it is sent (its ``sent_at``)."""
    pings, interval = idle_schedule(idle, heartbeat)
    start = time.monotonic()
    for seq in range(1, PROBES + 1):

        def probe(seq: int = seq) -> bytes:
            data = {
                "type": "probe",
                "seq": seq,
                "of": PROBES,
                "sent_at": time.time(),
                "interval": PROBE_INTERVAL,
                "idle": idle,
                "ping_interval": round(interval, 3),
            }
            if seq == 1:
                data["server"] = server
            return encode_json(data, event="probe", id=seq)

        yield start + (seq - 1) * PROBE_INTERVAL, probe
    quiet = time.monotonic()  # the silence starts when the last probe was sent
    for n in range(1, pings + 1):
        yield quiet + n * interval, lambda: PING

    def done() -> bytes:
        data = {
            "type": "done",
            "finished": True,
            "probes": PROBES,
            "pings": pings,
            "idle": idle,
            "sent_at": time.time(),
        }
        return encode_json(data, event="done", id=PROBES + 1)

    yield quiet + idle, done


@bp.get("/api/v1/diagnostics/stream")
@_limit
def diagnostics_stream() -> Response:
    idle = _idle_arg()
    forwarded = request.headers.get("X-Forwarded-For", "")
    server = {
        "protocol": request.environ.get("SERVER_PROTOCOL", ""),
        "forwarded": len([hop for hop in forwarded.split(",") if hop.strip()]),
    }
    body = probe_stream(idle, sluice().settings.heartbeat_seconds, client_watch(), server)
    return Response(
        body,
        status=200,
        content_type="text/event-stream",
        headers=SSE_HEADERS,
        direct_passthrough=True,
    )
