"""The /api/v1 blueprint: parse, authorize, hand over to the streaming core."""

from __future__ import annotations

import time

from flask import Blueprint, Response, g, jsonify, request, url_for

from streaming import metrics
from streaming.core import authenticate, sluice
from streaming.errors import ApiError
from streaming.follow import ClientWatch, follow_local, follow_log
from streaming.generation import Generation, GenerationRequest
from streaming.limits import default_limit, stream_limit
from streaming.manager import new_stream_id, valid_stream_id
from streaming.sse import is_done_frame
from streaming.validation import parse_completion, read_json

__all__ = ["bp", "client_watch", "start_generation"]

bp = Blueprint("api", __name__, url_prefix="/api/v1")
default_limit(bp)


@bp.before_request
def _authenticate() -> None:
    g.owner = authenticate(request, sluice().settings)


def _sse(body, stream_id: str) -> Response:
    return Response(
        body,
        status=200,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Stream-ID": stream_id},
        # The body goes to gunicorn as it is (bytes only; gunicorn calls its close()):
        # no werkzeug wrapping layers on every parked stream (~3.6 KB each).
        direct_passthrough=True,
    )


def start_generation(body: dict) -> Generation:
    """Validate a completion body (ours, or /v1's translated), then start it for this caller."""
    app = sluice()
    settings = app.settings
    parsed, messages, model = parse_completion(
        body,
        allowed_models=settings.models,
        default_model=settings.llm_model,
        max_prompt_chars=settings.max_prompt_chars,
    )
    upstream_messages = messages
    if parsed.session_id is not None:
        if app.manager.sessions.meta(parsed.session_id, g.owner) is None:
            raise ApiError(404, "not_found", "No such session.")
        upstream_messages = app.manager.sessions.history(parsed.session_id) + messages
    gen_request = GenerationRequest(
        stream_id=new_stream_id(),
        owner=g.owner,
        model=model,
        messages=upstream_messages,
        new_messages=messages,
        max_tokens=parsed.max_tokens,
        temperature=parsed.temperature,
        session_id=parsed.session_id,
        client=g.owner if settings.authenticated else (request.remote_addr or "unknown"),
    )
    return app.manager.start(gen_request)


def client_watch() -> ClientWatch:
    """The client socket watch (and send timeout) for the current request."""
    return ClientWatch(
        request.environ.get("gunicorn.socket"), sluice().settings.send_timeout_seconds
    )


@bp.post("/completions/stream")
@stream_limit
def stream_completion() -> Response:
    gen = start_generation(read_json(request))
    body = follow_local(gen, 0, sluice().settings.heartbeat_seconds, client_watch())
    return _sse(body, gen.stream_id)


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
    app = sluice()
    stream_id = _checked_id(stream_id)
    after = _last_event_id()
    info = app.manager.info(stream_id, g.owner)
    if info is None:
        raise ApiError(404, "not_found", "No such stream.")
    heartbeat = app.settings.heartbeat_seconds
    gen = app.manager.local.get(stream_id)
    if gen is not None:
        return _sse(follow_local(gen, after, heartbeat, client_watch()), stream_id)
    if info["state"] == "finished":
        if info.get("events", "").isdigit() and after >= int(info["events"]):
            # the client has `done`: 204 tells a browser EventSource to stop reconnecting
            return Response(status=204)
        frames = app.manager.log.read(stream_id, after)
        if frames and is_done_frame(frames[-1]):
            return _sse([b"".join(frames)], stream_id)
    body = follow_log(app.manager.reader, stream_id, after, heartbeat, client_watch())
    return _sse(body, stream_id)


@bp.delete("/completions/stream/<stream_id>")
def cancel_stream(stream_id: str) -> Response:
    stream_id = _checked_id(stream_id)
    started = time.perf_counter()
    status = sluice().manager.cancel(stream_id, g.owner)
    if status == "cancelled":
        metrics.CANCEL_LATENCY.observe(time.perf_counter() - started)
    if status is None:
        raise ApiError(404, "not_found", "No such stream.")
    return jsonify(stream_id=stream_id, status=status)
