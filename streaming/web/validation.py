"""Request bodies: JSON parsing and the completion request, checked at the edge.

Every rejection is an `ApiError` with the codes of the API; nothing is stored
for a rejected request.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from flask import Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from streaming.web.errors import ApiError

__all__ = ["CompletionBody", "parse_completion", "read_json"]


def read_json(request: Request) -> dict:
    """The body as a JSON object: 415 unless application/json, 413 past the limit."""
    if request.mimetype != "application/json":
        raise ApiError(415, "unsupported_media_type", "The body must be application/json.")
    raw = request.get_data(cache=True)  # raises 413 past MAX_CONTENT_LENGTH
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_request", "The body must be a JSON object.")
    return body


Text = Annotated[StrictStr, Field(max_length=10_000_000)]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class CompletionBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: Text | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=1000)] | None = None
    session_id: Annotated[StrictStr, Field(max_length=64)] | None = None
    model: Annotated[StrictStr, Field(min_length=1, max_length=200)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=131_072)] | None = None
    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None


def _field_name(error: dict) -> str:
    parts = [str(p) for p in error.get("loc", ())]
    return ".".join(parts) or "body"


def parse_completion(
    body: dict, *, allowed_models: tuple[str, ...], default_model: str, max_prompt_chars: int
) -> tuple[CompletionBody, list[dict[str, str]], str]:
    """Validate a completion body; returns it, the messages to send, and the model."""
    try:
        parsed = CompletionBody.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = _field_name(error)
        raise ApiError(400, "invalid_request", f"Invalid field '{name}': {error['msg']}.") from None
    if (parsed.prompt is None) == (parsed.messages is None):
        raise ApiError(400, "invalid_request", "Give exactly one of 'prompt' and 'messages'.")
    if parsed.prompt is not None:
        if not parsed.prompt.strip():
            raise ApiError(400, "invalid_request", "Invalid field 'prompt': it is empty.")
        messages = [{"role": "user", "content": parsed.prompt}]
        field = "prompt"
    else:
        messages = [{"role": m.role, "content": m.content} for m in parsed.messages or ()]
        field = "messages"
    if sum(len(m["content"]) for m in messages) > max_prompt_chars:
        raise ApiError(
            400,
            "invalid_request",
            f"Invalid field '{field}': more than {max_prompt_chars} characters.",
        )
    model = parsed.model or default_model
    if model not in allowed_models:
        raise ApiError(400, "model_not_allowed", f"The model '{model[:100]}' is not allowed here.")
    return parsed, messages, model
