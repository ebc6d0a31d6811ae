"""The /v1 answer: a generation's SSE frames as OpenAI chunks, or as one chat.completion.

A /v1 generation's frames (`streaming.core.generation`): ``start``, ``token``
(text), ``delta`` (every other delta the upstream sent: ``tool_calls``
fragments, ``refusal``, ``logprobs``, ...; raw, in order with the text),
``error``, the one ``done`` (``reason`` is the upstream's ``finish_reason``,
or ``cancelled``/``error``), and ``: ping`` comments.

- `chunks` (``stream: true``), one output per input chunk: ``start`` -> the
  role chunk; the ``token`` frames in a row -> one content chunk; each delta
  of a ``delta`` frame -> one chunk whose delta is it (``logprobs`` back at the
  choice level); ``done`` -> the ``finish_reason`` chunk, the usage chunk
  (``choices: []``) if the client asked, ``data: [DONE]``. A failed or
  cancelled stream ends with an OpenAI error object and ``[DONE]`` instead.
  Pings pass through.
- `completion` (``stream: false``): the text, and the deltas accumulated as
  OpenAI's SDKs accumulate them (strings joined, ``tool_calls`` merged by
  ``index``, lists extended), into one message: ``content`` (null when the
  answer is only tool calls or a refusal), ``refusal``, ``tool_calls`` (without
  their stream ``index``) and any other field; ``logprobs`` at the choice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

from streaming.core.generation import Generation
from streaming.sse import PING, compact_json, read_frames

__all__ = ["FAILURE_STATUS", "chunks", "completion", "error_body", "failure"]

_DONE = b"data: [DONE]\n\n"
# Our in-stream error codes -> the HTTP status of a non-streaming answer.
FAILURE_STATUS = {
    "upstream_rate_limited": 429,
    "upstream_timeout": 504,
    "upstream_error": 502,
    "upstream_unavailable": 503,  # every upstream of the model down or cooling (section 11)
    "interrupted": 503,
    "internal_error": 500,
    "cancelled": 499,
}
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
_TYPES |= {499: "cancelled"}
# A stream that ended neither by the upstream's finish nor with an error event.
_CANCELLED = {"code": "cancelled", "message": "The stream was cancelled."}
_FAILED = {"code": "internal_error", "message": "The generation failed."}


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    kind = _TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def failure(done: dict[str, Any], error: dict[str, str] | None) -> dict[str, str] | None:
    """The error a stream ended with ({} = no done: cancelled); None when the upstream finished."""
    reason = done.get("reason", "cancelled")
    if error is None and reason not in ("cancelled", "error"):
        return None
    return error or (_CANCELLED if reason == "cancelled" else _FAILED)


def usage_of(usage: dict[str, Any]) -> dict[str, int]:
    p, c = usage["prompt_tokens"], usage["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + compact_json(payload).encode() + b"\n\n"


def chunks(gen: Generation, frames: Iterable[bytes], include_usage: bool) -> Iterator[bytes]:
    """Our SSE frames -> OpenAI ``chat.completion.chunk`` events, one output per input chunk."""
    base = {
        "id": gen.stream_id,
        "object": "chat.completion.chunk",
        "created": int(gen.created),
        "model": gen.request.model,
    }
    extra: dict[str, Any] = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
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
            if event == b"delta":
                for delta in json.loads(data)["deltas"]:
                    logprobs = delta.pop("logprobs", None)
                    out.append(chunk(delta, None, logprobs))
            elif event == b"start":
                out.append(chunk({"role": "assistant", "content": ""}))
            elif event == b"ping":
                out.append(PING)
            elif event == b"error":
                error = json.loads(data)["error"]
            elif event == b"done":
                done = json.loads(data)
                error = failure(done, error)
                if error is None:
                    out.append(chunk({}, done["reason"]))
                    if include_usage:
                        usage = usage_of(done["usage"])
                        out.append(_data({**base, "choices": [], "usage": usage}))
                else:
                    status = FAILURE_STATUS.get(error["code"], 500)
                    out.append(_data(error_body(status, error["code"], error["message"])))
                out.append(_DONE)
        if text:
            out.append(chunk({"content": "".join(text)}))
        if out:
            yield b"".join(out)


# -- the non-streaming answer ------------------------------------------------------------


def accumulate(acc: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Merge one delta into `acc` the way OpenAI's SDKs do for a streamed message."""
    for key, value in delta.items():
        old = acc.get(key)
        if old is None:
            acc[key] = _copy(value)
        elif key in ("index", "type", "id"):
            acc[key] = value
        elif isinstance(old, str) and isinstance(value, str):
            acc[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            accumulate(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            for entry in value:
                index = entry.get("index") if isinstance(entry, dict) else None
                if not isinstance(index, int):
                    old.append(_copy(entry))
                    continue
                same = next((e for e in old if _index(e) == index), None)
                if same is None:
                    old.append(_copy(entry))
                else:
                    accumulate(same, entry)
        else:
            acc[key] = value
    return acc


def _index(entry: Any) -> Any:
    return entry.get("index") if isinstance(entry, dict) else None


def _copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def completion(
    gen: Generation, frames: Iterable[bytes]
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """Drain the frames: (the ``chat.completion``, None) or (None, the error it ended with)."""
    done: dict[str, Any] = {}
    error: dict[str, str] | None = None
    text: list[str] = []
    acc: dict[str, Any] = {}
    logprobs: dict[str, Any] | None = None
    for raw in frames:
        for event, data in read_frames(raw):
            if event == b"token":
                text.append(json.loads(data)["token"])
            elif event == b"delta":
                for delta in json.loads(data)["deltas"]:
                    lp = delta.pop("logprobs", None)
                    if lp is not None:
                        logprobs = accumulate(logprobs if logprobs is not None else {}, lp)
                    accumulate(acc, delta)
            elif event == b"error":
                error = json.loads(data)["error"]
            elif event == b"done":
                done = json.loads(data)
    error = failure(done, error)
    if error is not None:
        return None, error
    tool_calls = acc.pop("tool_calls", None)
    refusal = acc.pop("refusal", None)
    content = "".join(text)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content if content or not (tool_calls or refusal) else None,
        "refusal": refusal,
        **acc,
    }
    if tool_calls:
        message["tool_calls"] = [
            {k: v for k, v in call.items() if k != "index"}
            for call in sorted(tool_calls, key=lambda c: c.get("index", 0))
        ]
    choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": done["reason"]}
    answer = {
        "id": gen.stream_id,
        "object": "chat.completion",
        "created": int(gen.created),
        "model": gen.request.model,
        "choices": [choice],
        "usage": usage_of(done["usage"]),
    }
    return answer, None
