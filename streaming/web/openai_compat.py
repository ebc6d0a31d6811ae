"""The /v1 blueprint: OpenAI's chat completions and models API over the Sluice core.

Flow. ``POST /v1/chat/completions`` authenticates (`authenticate`: open mode
ignores the SDK's Authorization header) and checks OpenAI's body with
`streaming.web.openai_request.parse_openai`: Sluice owns ``model``,
``messages`` (checked, forwarded as given), ``stream``, ``stream_options``,
the token caps and ``temperature``; every other field is forwarded to the
upstream unchanged (the pass-through rule; ``n`` other than 1 is a 400).
``X-Session-ID`` works like ``session_id`` in /api/v1. The generation starts
through the same `StreamManager` (Redis registry, slots, §5 DELETE cancels it,
the native GET resumes it) as a generation that relays every delta
(`GenerationRequest.relay_deltas`: text as ``token`` events, the rest as
``delta`` events), and is followed in-process with `follow_local`, whose
frames `streaming.web.openai_answer` turns into OpenAI chunks (``stream:
true``) or one ``chat.completion`` (``stream: false``; the follower keeps the
client watched, so a client that hangs up cancels the generation after the
grace window). A failed or cancelled stream ends with an OpenAI error object
and ``[DONE]`` instead of a ``finish_reason``: the SDKs raise ``APIError``
with ``code`` = ours; a non-streaming one answers the status of
`FAILURE_STATUS` (``cancelled`` -> 499, nginx's "client closed request", is
not retried by the SDKs, unlike 409 or 5xx, which would start a new one).

Errors. Every error answered on a /v1 route (ours, or the app's handlers in
streaming.web.errors: same statuses, codes and messages as §3) is reshaped by an
``after_request`` hook into ``{"error": {"message", "type", "param", "code"}}``
with ``code`` = our code; 429s always carry ``Retry-After``.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from streaming.core import service
from streaming.core.follow import Body, follow_local
from streaming.sse import compact_json
from streaming.web.context import sluice
from streaming.web.errors import ApiError
from streaming.web.limits import default_limit, stream_limit
from streaming.web.openai_answer import FAILURE_STATUS, chunks, completion
from streaming.web.openai_answer import error_body as _error_body
from streaming.web.openai_request import parse_openai
from streaming.web.validation import CompletionBody, read_json
from streaming.web.views import authenticated, client_watch, limit_client, sse_response

__all__ = ["bp", "error_body"]

bp = authenticated(Blueprint("openai_compat", __name__, url_prefix="/v1"))
default_limit(bp)

_FIELD = re.compile(r"Invalid field '([^']*)'")


# -- errors ---------------------------------------------------------------------------


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """OpenAI's error object; ``param`` names the offending field when ours does."""
    field = _FIELD.match(message)
    param = field.group(1) if field else ("model" if code == "model_not_allowed" else None)
    return _error_body(status, code, message, param)


@bp.after_request
def _openai_errors(response: Response) -> Response:
    """Reshape §3 error bodies (from any handler) into OpenAI's; runs before the limiter's."""
    if response.status_code < 400 or response.mimetype != "application/json":
        return response
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "type" not in error:
        status, code = response.status_code, str(error.get("code") or "internal_error")
        response.set_data(compact_json(error_body(status, code, str(error.get("message") or ""))))
    if response.status_code == 429 and "Retry-After" not in response.headers:
        response.headers["Retry-After"] = "1"
    return response


# -- the completion ---------------------------------------------------------------------


def _answer(gen, frames: Body) -> Response:
    """Drain the follower, then answer one ``chat.completion`` (or an OpenAI error)."""
    try:
        answer, error = completion(gen, frames)
    finally:
        frames.close()
    if error is not None:  # (no done: the client hung up, nobody reads this)
        status = FAILURE_STATUS.get(error["code"], 500)
        response = jsonify(error_body(status, error["code"], error["message"]))
        response.status_code = status
    else:
        response = jsonify(answer)
    response.headers["X-Stream-ID"] = gen.stream_id
    return response


@bp.post("/chat/completions")
@stream_limit
def chat_completions() -> Response:
    app = sluice()
    settings = app.settings
    req = parse_openai(
        read_json(request),
        allowed_models=settings.models,
        default_model=settings.llm_model,
        max_chars=settings.max_prompt_chars,
    )
    session_id = request.headers.get("X-Session-ID") or None
    if session_id is not None and len(session_id) > 64:
        raise ApiError(400, "invalid_request", "Invalid field 'session_id': too long.")
    body = CompletionBody.model_construct(  # checked above, as the native body would be
        prompt=None,
        messages=None,
        session_id=session_id,
        model=req.model,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
    )
    extra = {
        "max_completion_tokens": req.max_completion_tokens,
        "params": req.params,
        "stream_options": req.stream_options or None,
        "relay_deltas": True,
    }
    gen = service.start(
        app.manager, body, req.messages, req.model, g.owner, limit_client(), "v1", extra
    )
    frames = follow_local(gen, 0, settings.heartbeat_seconds, client_watch())
    if not req.stream:
        return _answer(gen, frames)
    return sse_response(Body(chunks(gen, frames, req.include_usage), frames.close), gen.stream_id)


# -- models ---------------------------------------------------------------------------


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "sluice"}


@bp.get("/models")
def list_models() -> Response:
    return jsonify(object="list", data=[_model(m) for m in sluice().settings.models])


@bp.get("/models/<path:model>")
def get_model(model: str) -> Response:
    if model not in sluice().settings.models:
        raise ApiError(404, "not_found", f"The model '{model[:100]}' does not exist here.")
    return jsonify(_model(model))
