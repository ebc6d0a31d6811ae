"""The /api/v1 streaming blueprint: parse, authorize, hand over to `streaming.core.service`."""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, jsonify, request, url_for

from streaming import metrics
from streaming.core import service
from streaming.core.follow import follow_local
from streaming.core.manager import valid_stream_id
from streaming.web.context import sluice
from streaming.web.errors import ApiError
from streaming.web.limits import default_limit, stream_limit
from streaming.web.validation import read_json
from streaming.web.views import authenticated, client_watch, sse_response, start_generation

__all__ = ["bp"]

bp = authenticated(Blueprint("api", __name__, url_prefix="/api/v1"))
default_limit(bp)


@bp.post("/completions/stream")
@stream_limit
def stream_completion() -> Response:
    gen = start_generation(read_json(request))
    body = follow_local(gen, 0, sluice().settings.heartbeat_seconds, client_watch())
    return sse_response(body, gen.stream_id)


@bp.post("/completions")
@stream_limit
def start_completion() -> tuple[Response, int]:
    gen = start_generation(read_json(request))
    gen.start_grace()  # nobody attached yet
    url = url_for("api.attach_stream", stream_id=gen.stream_id)
    return jsonify(stream_id=gen.stream_id, stream_url=url), 202


def _checked_id(stream_id: str) -> str:
    if not valid_stream_id(stream_id):
        raise ApiError(404, "not_found", "No such stream.")
    return stream_id


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id") or "0"
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise ApiError(400, "invalid_request", "Invalid field 'Last-Event-ID': not an event id.")
    return int(raw)


@bp.get("/completions/stream/<stream_id>")
def attach_stream(stream_id: str) -> Response:
    stream_id = _checked_id(stream_id)
    after = _last_event_id()
    app = sluice()
    body = service.attach(
        app.manager, stream_id, g.owner, after, app.settings.heartbeat_seconds, client_watch
    )
    if body is None:
        # the client has `done` already: 204 tells a browser EventSource to stop reconnecting
        return Response(status=204)
    return sse_response(body, stream_id)


@bp.delete("/completions/stream/<stream_id>")
def cancel_stream(stream_id: str) -> Response:
    stream_id = _checked_id(stream_id)
    started = time.perf_counter()
    status = service.cancel(sluice().manager, stream_id, g.owner)
    if status == "cancelled":
        metrics.CANCEL_LATENCY.observe(time.perf_counter() - started)
    return jsonify(stream_id=stream_id, status=status)
