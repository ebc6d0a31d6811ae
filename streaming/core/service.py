"""The streaming core's entry points for the web layer: start, attach, cancel.

No Flask and no HTTP status here: the blueprints (`streaming.web.api`,
`streaming.web.openai_compat`) parse and authorize, call these, and map the
domain errors (`streaming.core.exceptions`) to the API's codes in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from streaming.core.exceptions import NotFound
from streaming.core.follow import ClientWatch, follow_local, follow_log
from streaming.core.generation import Generation, GenerationRequest
from streaming.core.manager import StreamManager, new_stream_id
from streaming.sse import is_done_frame, without_deltas
from streaming.web.validation import CompletionBody

__all__ = ["attach", "cancel", "start"]


def start(
    manager: StreamManager,
    body: CompletionBody,
    messages: list[dict[str, str]],
    model: str,
    owner: str,
    client: str,
    surface: str = "api",
    extra: dict[str, Any] | None = None,
) -> Generation:
    """Start a validated completion for `owner`; `client` is who its limits, slots, usage
    and budget count against; `surface` ("api" or "v1") labels its usage in the metrics.

    Refusals are domain errors: `NotFound` (session), then from admission
    `BudgetExhausted`, `TooManyStreams`, `SessionBusy`.
    """
    upstream_messages = messages
    if body.session_id is not None:
        if manager.sessions.meta(body.session_id, owner) is None:
            raise NotFound("No such session.")
        upstream_messages = manager.sessions.history(body.session_id) + messages
    request = GenerationRequest(
        stream_id=new_stream_id(),
        owner=owner,
        model=model,
        messages=upstream_messages,
        new_messages=messages,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        session_id=body.session_id,
        client=client,
        surface=surface,
        **(extra or {}),  # /v1: max_completion_tokens, params, stream_options, relay_deltas
    )
    return manager.start(request)


def attach(
    manager: StreamManager,
    stream_id: str,
    owner: str,
    after: int,
    heartbeat: float,
    watch: Callable[[], ClientWatch],
) -> Iterable[bytes] | None:
    """The body that replays a stream after seq `after` and follows it to ``done``.

    None when the stream is finished and the client has its ``done`` already
    (the web layer answers 204). A finished stream is replayed with one XRANGE;
    a live one is followed in-process here, or through the worker's log reader.
    """
    info = manager.info(stream_id, owner)
    if info is None:
        raise NotFound("No such stream.")
    gen = manager.local.get(stream_id)
    # The native API is text-only: a /v1 generation's `delta` events are skipped.
    if gen is not None:
        return follow_local(gen, after, heartbeat, watch(), text_only=True)
    if info["state"] == "finished":
        if info.get("events", "").isdigit() and after >= int(info["events"]):
            return None
        frames = manager.log.read(stream_id, after)
        if frames and is_done_frame(frames[-1]):
            return [without_deltas(b"".join(frames))]
    return follow_log(manager.reader, stream_id, after, heartbeat, watch(), text_only=True)


def cancel(manager: StreamManager, stream_id: str, owner: str) -> str:
    """'cancelled' once the stream was stopped wherever it ran, or 'finished'."""
    status = manager.cancel(stream_id, owner)
    if status is None:
        raise NotFound("No such stream.")
    return status
