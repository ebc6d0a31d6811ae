"""The /v1 request: OpenAI's chat completion body, checked, split into ours and the rest.

The pass-through rule. Sluice owns a few fields; every other field of the
body is forwarded to the upstream unchanged (`OpenAIRequest.params`), known
to Sluice or not (``tools``, ``tool_choice``, ``response_format``, ``stop``,
``seed``, ``user``, ``logprobs``, ``metadata``, fields OpenAI adds later...):
nothing is dropped.

Owned (`OWNED`):

- ``model``: checked against the allowed models (``model_not_allowed``);
  ``LLM_MODEL`` when absent.
- ``messages``: checked (roles ``system``, ``developer``, ``user``,
  ``assistant``, ``tool``; content a string, an array of parts, or null where
  OpenAI allows it; a tool message's ``tool_call_id``), counted against
  ``MAX_PROMPT_CHARS`` (their text), then forwarded exactly as given.
- ``stream``, ``stream_options``: Sluice always streams from the upstream and
  always asks it for usage; the client's ``stream_options`` are forwarded with
  ``include_usage`` forced on, and the client gets the usage chunk only if it
  asked.
- ``max_tokens``, ``max_completion_tokens``: the token caps, forwarded as the
  client named them (budgets lower them), each checked (1..131072).
- ``temperature``: checked (0..2) like the native API's, forwarded as given.
- ``n``: forwarded when 1; anything else is ``400 invalid_request`` naming ``n``
  (one choice per stream).

A few forwarded fields get a shape check, so that a malformed one is a 400
here rather than an upstream failure: ``tools`` (array of objects),
``tool_choice`` (string or object), ``response_format`` (object), ``stop``
(string or array of strings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streaming.core.messages import content_length
from streaming.web.errors import ApiError

__all__ = ["OWNED", "OpenAIRequest", "parse_openai"]

OWNED = frozenset(
    {
        "model",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
    }
)
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_MESSAGES = 1000
MAX_CAP = 131_072


@dataclass
class OpenAIRequest:
    messages: list[dict[str, Any]]
    model: str
    stream: bool = False
    include_usage: bool = False
    stream_options: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    params: dict[str, Any] = field(default_factory=dict)  # forwarded as given


def _bad(name: str, why: str) -> ApiError:
    return ApiError(400, "invalid_request", f"Invalid field '{name}': {why}.")


def _cap(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= MAX_CAP:
        raise _bad(name, f"an integer from 1 to {MAX_CAP}")
    return value


def _message(index: int, message: Any) -> None:
    where = f"messages.{index}"
    if not isinstance(message, dict):
        raise _bad(where, "not an object")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):
        for n, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _bad(f"{where}.content.{n}", "a part object with a 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise _bad(f"{where}.content.{n}.text", "a string")
    elif content is None:
        # only an assistant message may go without content (it carries tool calls)
        if role != "assistant" or not message.get("tool_calls") and not message.get("refusal"):
            raise _bad(f"{where}.content", "it is required")
    elif not isinstance(content, str):
        raise _bad(f"{where}.content", "a string or an array of parts")
    tool_calls = message.get("tool_calls")
    if tool_calls is not None and (
        role != "assistant"
        or not isinstance(tool_calls, list)
        or not all(isinstance(c, dict) for c in tool_calls)
    ):
        raise _bad(f"{where}.tool_calls", "an array of objects, on an assistant message")
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise _bad(f"{where}.tool_call_id", "a string, required on a tool message")


def _messages(body: dict[str, Any], max_chars: int) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise _bad("messages", "it is required")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty array")
    if len(messages) > MAX_MESSAGES:
        raise _bad("messages", f"at most {MAX_MESSAGES} messages")
    for index, message in enumerate(messages):
        _message(index, message)
    if sum(content_length(m.get("content")) for m in messages) > max_chars:
        raise _bad("messages", f"more than {max_chars} characters")
    return messages


def _forwarded_shapes(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise _bad("n", "only 1 is supported (one choice per stream)")
    tools = body.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise _bad("tools", "an array of tool objects")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, (str, dict)):
        raise _bad("tool_choice", "a string or an object")
    response_format = body.get("response_format")
    if response_format is not None and not isinstance(response_format, dict):
        raise _bad("response_format", "an object")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        raise _bad("stop", "a string or an array of strings")


def parse_openai(
    body: dict[str, Any], *, allowed_models: tuple[str, ...], default_model: str, max_chars: int
) -> OpenAIRequest:
    """Check OpenAI's body; what Sluice owns, and the rest to forward as given."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "not a boolean")
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options", "not valid")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not 1 <= len(model) <= 200):
        raise _bad("model", "a model name")
    messages = _messages(body, max_chars)
    max_tokens = _cap(body, "max_tokens")
    max_completion_tokens = _cap(body, "max_completion_tokens")
    temperature = body.get("temperature")
    if temperature is not None and (
        type(temperature) not in (int, float) or not 0 <= temperature <= 2
    ):
        raise _bad("temperature", "a number from 0 to 2")
    _forwarded_shapes(body)
    model = model or default_model
    if model not in allowed_models:
        raise ApiError(400, "model_not_allowed", f"The model '{model[:100]}' is not allowed here.")
    return OpenAIRequest(
        messages=messages,
        model=model,
        stream=bool(stream),
        include_usage=bool(options.get("include_usage")),
        stream_options={k: v for k, v in options.items() if k != "include_usage"},
        max_tokens=max_tokens,
        max_completion_tokens=max_completion_tokens,
        temperature=temperature,
        params={k: v for k, v in body.items() if k not in OWNED},
    )
