"""The /v1 blueprint: OpenAI's chat completions and models API over the Sluice core.

Flow. ``POST /v1/chat/completions`` authenticates (`authenticate`: open mode
ignores the SDK's Authorization header), takes OpenAI's body apart into our
completion body (``max_completion_tokens`` wins over ``max_tokens``; text-part
arrays become strings; other OpenAI fields are ignored) and validates it with
`parse_completion`, so the limits are those of /api/v1. ``X-Session-ID`` works
like ``session_id`` there. The generation starts through the same
`StreamManager` (Redis registry, slots, §5 DELETE cancels it) and is followed
in-process with `follow_local`, whose SSE frames (``id/event/data``, several
per chunk, ``: ping`` comments) are translated one chunk at a time:

- ``stream: true``: ``start`` -> the role chunk; the ``token`` frames of one
  chunk -> one content chunk; ``done`` -> the ``finish_reason`` chunk, the usage
  chunk (``choices: []``) if ``stream_options.include_usage``, ``data: [DONE]``.
  Pings pass through. A failed or cancelled stream ends with an OpenAI error
  object ``data: {"error": {...}}`` and ``[DONE]`` instead of a finish_reason
  (a ``stop`` would pass a cut-off answer for a complete one): the SDKs raise
  ``APIError`` with ``code`` = ours (``cancelled``, ``upstream_error``, ...).
- ``stream: false``: the same follower is drained here (it keeps the client
  watched: a client that hangs up cancels the generation after the grace
  window), then one ``chat.completion`` is answered, or an error: see
  `_FAILURE_STATUS` (``cancelled`` -> 499, nginx's "client closed request", is
  not retried by the SDKs, unlike 409 or 5xx, which would start a new one).

Errors. Every error answered on a /v1 route (ours, or the app's handlers in
streaming.web.errors: same statuses, codes and messages as §3) is reshaped by an
``after_request`` hook into ``{"error": {"message", "type", "param", "code"}}``
with ``code`` = our code; 429s always carry ``Retry-After``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request

from streaming.core.follow import Body, follow_local
from streaming.core.generation import Generation
from streaming.sse import PING, compact_json, read_frames
from streaming.web.context import sluice
from streaming.web.errors import ApiError
from streaming.web.limits import default_limit, stream_limit
from streaming.web.validation import read_json
from streaming.web.views import authenticated, client_watch, sse_response, start_generation

__all__ = ["bp", "error_body", "openai_request"]

bp = authenticated(Blueprint("openai_compat", __name__, url_prefix="/v1"))
default_limit(bp)

_JSON = compact_json
_DONE = b"data: [DONE]\n\n"
_FIELD = re.compile(r"Invalid field '([^']*)'")
# Our in-stream error codes -> the HTTP status of a non-streaming answer.
_FAILURE_STATUS = {
    "upstream_rate_limited": 429,
    "upstream_timeout": 504,
    "upstream_error": 502,
    "interrupted": 503,
    "internal_error": 500,
    "cancelled": 499,
}
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_TYPES |= {499: "cancelled"}
# A stream that ended neither by stop/length nor with an error event.
_CANCELLED = {"code": "cancelled", "message": "The stream was cancelled."}
_FAILED = {"code": "internal_error", "message": "The generation failed."}


# -- errors ---------------------------------------------------------------------------


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    """OpenAI's error object; ``param`` names the offending field when ours does."""
    field = _FIELD.match(message)
    param = field.group(1) if field else ("model" if code == "model_not_allowed" else None)
    kind = _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@bp.after_request
def _openai_errors(response: Response) -> Response:
    """Reshape §3 error bodies (from any handler) into OpenAI's; runs before the limiter's."""
    if response.status_code < 400 or response.mimetype != "application/json":
        return response
    body = response.get_json(silent=True)
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "type" not in error:
        status, code = response.status_code, str(error.get("code") or "internal_error")
        response.set_data(_JSON(error_body(status, code, str(error.get("message") or ""))))
    if response.status_code == 429 and "Retry-After" not in response.headers:
        response.headers["Retry-After"] = "1"
    return response


# -- the request ----------------------------------------------------------------------


def _text(content: Any) -> Any:
    """OpenAI's text-part arrays as one string; anything else is left to validation."""
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    return content


def openai_request(body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """Our completion body from OpenAI's, plus ``stream`` and ``include_usage``."""
    stream, options = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise ApiError(400, "invalid_request", "Invalid field 'stream': not a boolean.")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, "invalid_request", "Invalid field 'stream_options': not valid.")
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "invalid_request", "Invalid field 'messages': it is required.")
    if isinstance(messages, list):
        messages = [
            {**m, "content": _text(m.get("content"))} if isinstance(m, dict) else m
            for m in messages
        ]
    max_tokens = body.get("max_completion_tokens")
    ours = {
        "messages": messages,
        "model": body.get("model"),
        "max_tokens": max_tokens if max_tokens is not None else body.get("max_tokens"),
        "temperature": body.get("temperature"),
        "session_id": request.headers.get("X-Session-ID") or None,
    }
    return ours, stream, bool(options.get("include_usage"))


# -- the answer -----------------------------------------------------------------------


def _usage(usage: dict[str, Any]) -> dict[str, int]:
    p, c = usage["prompt_tokens"], usage["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + _JSON(payload).encode() + b"\n\n"


def _chunks(gen: Generation, frames: Iterator[bytes], include_usage: bool) -> Iterator[bytes]:
    """Our SSE frames -> OpenAI ``chat.completion.chunk`` events, one output per input chunk."""
    base = {
        "id": gen.stream_id,
        "object": "chat.completion.chunk",
        "created": int(gen.created),
        "model": gen.request.model,
    }
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _data({**base, "choices": [choice], **extra})

    error: dict[str, str] | None = None
    for raw in frames:
        out: list[bytes] = []
        text: list[str] = []
        for event, data in read_frames(raw):
            if event == b"token":
                text.append(json.loads(data)["token"])
                continue
            if text:
                out.append(chunk({"content": "".join(text)}))
                text = []
            if event == b"start":
                out.append(chunk({"role": "assistant", "content": ""}))
            elif event == b"ping":
                out.append(PING)
            elif event == b"error":
                error = json.loads(data)["error"]
            elif event == b"done":
                done = json.loads(data)
                error = _failure(done, error)
                if error is None:
                    out.append(chunk({}, done["reason"]))
                    if include_usage:
                        out.append(_data({**base, "choices": [], "usage": _usage(done["usage"])}))
                else:
                    status = _FAILURE_STATUS.get(error["code"], 500)
                    out.append(_data(error_body(status, error["code"], error["message"])))
                out.append(_DONE)
        if text:
            out.append(chunk({"content": "".join(text)}))
        yield b"".join(out)


def _failure(done: dict[str, Any], error: dict[str, str] | None) -> dict[str, str] | None:
    """The error a stream ended with ({} = no done: cancelled), None for stop or length."""
    if error is None and done.get("reason") in ("stop", "length"):
        return None
    return error or (_CANCELLED if done.get("reason", "cancelled") == "cancelled" else _FAILED)


def _completion(gen: Generation, frames: Body) -> Response:
    """Drain the follower, then answer one ``chat.completion`` (or an OpenAI error)."""
    done: dict[str, Any] = {}
    error: dict[str, str] | None = None
    try:
        for raw in frames:
            for event, data in read_frames(raw):
                if event == b"error":
                    error = json.loads(data)["error"]
                elif event == b"done":
                    done = json.loads(data)
    finally:
        frames.close()
    error = _failure(done, error)  # no done: the client hung up, nobody reads this
    if error is not None:
        status = _FAILURE_STATUS.get(error["code"], 500)
        response = jsonify(error_body(status, error["code"], error["message"]))
        response.status_code = status
        response.headers["X-Stream-ID"] = gen.stream_id
        return response
    response = jsonify(
        id=gen.stream_id,
        object="chat.completion",
        created=int(gen.created),
        model=gen.request.model,
        choices=[
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(gen.text)},
                "logprobs": None,
                "finish_reason": done["reason"],
            }
        ],
        usage=_usage(done["usage"]),
    )
    response.headers["X-Stream-ID"] = gen.stream_id
    return response


@bp.post("/chat/completions")
@stream_limit
def chat_completions() -> Response:
    ours, stream, include_usage = openai_request(read_json(request))
    gen = start_generation(ours)
    watch = client_watch()
    frames = follow_local(gen, 0, sluice().settings.heartbeat_seconds, watch)
    if not stream:
        return _completion(gen, frames)
    return sse_response(Body(_chunks(gen, frames, include_usage), frames.close), gen.stream_id)


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
