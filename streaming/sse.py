"""Server-Sent Events framing: pure functions, no Flask, no I/O.

A frame is ``id: <n>\\nevent: <name>\\ndata: <line>\\n...\\n\\n``. Data that holds
newlines is split over several ``data:`` lines (the browser joins them back
with ``\\n``), so a newline inside a token can never end a frame early;
newlines are stripped from ``id`` and ``event``. Comments (``: ping``) keep a
quiet connection alive and let the server notice a client that went away.
Every ``/api`` event stream begins with `RETRY` (``retry: 1000``, a block with
no data, so no event): a browser `EventSource` then reconnects after a second,
well inside ``DISCONNECT_GRACE_SECONDS``, instead of its default three.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

__all__ = [
    "DELTA_EVENT",
    "PING",
    "RETRY",
    "RETRY_MS",
    "comment",
    "compact_json",
    "encode",
    "encode_json",
    "is_done_frame",
    "parse",
    "read_frames",
    "split_frames",
    "without_deltas",
]

_LINE_BREAKS = re.compile(r"\r\n|\r|\n")
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
compact_json = _JSON  # the one compact JSON encoder (the /v1 chunks use it too)


def _field(value: str) -> str:
    return _LINE_BREAKS.sub("", value)


def encode(data: str, *, event: str | None = None, id: int | str | None = None) -> bytes:
    """One SSE frame carrying `data` (any text; newlines become extra data lines)."""
    parts = []
    if id is not None:
        parts.append(f"id: {_field(str(id))}\n")
    if event is not None:
        parts.append(f"event: {_field(event)}\n")
    for line in _LINE_BREAKS.split(data):
        parts.append(f"data: {line}\n")
    parts.append("\n")
    return "".join(parts).encode()


def encode_json(payload: object, *, event: str, id: int) -> bytes:
    """A frame whose data is `payload` as one line of JSON (the hot path)."""
    # JSON escapes every control character, so the data is always one line.
    return f"id: {id}\nevent: {_field(event)}\ndata: {_JSON(payload)}\n\n".encode()


def comment(text: str = "") -> bytes:
    """A comment frame; clients ignore it, proxies and sockets see traffic."""
    return "".join(f": {line}\n" for line in _LINE_BREAKS.split(text)).encode() + b"\n"


PING = comment("ping")
RETRY_MS = 1000
RETRY = f"retry: {RETRY_MS}\n\n".encode()  # the first bytes of every /api event stream


# -- reading our own frames back (the event log, followers) ----------------------------


def split_frames(data: bytes) -> list[bytes]:
    """The frames of several joined frames (each ends in a blank line; none holds one)."""
    return [frame + b"\n\n" for frame in data.split(b"\n\n")[:-1]]


def read_frames(chunk: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(event name, JSON data) of each frame in joined frames; comments as (b"ping", b"")."""
    for frame in chunk.split(b"\n\n"):
        if frame.startswith(b"id: "):
            _id, event, data = frame.split(b"\n", 2)
            yield event[7:], data[6:]
        elif frame:
            yield b"ping", b""


DELTA_EVENT = b"\nevent: delta\n"  # /v1 generations' non-text deltas (streaming.core.generation)


def without_deltas(chunk: bytes) -> bytes:
    """Joined frames without the ``delta`` events (the native API is text-only).

    One substring search when there are none (every chunk of a native stream).
    """
    if DELTA_EVENT not in chunk:
        return chunk
    return b"".join(f for f in split_frames(chunk) if DELTA_EVENT not in f[:48])


def is_done_frame(frame: bytes) -> bool:
    """Is this frame (as `encode_json` writes it) the ``done`` event?"""
    return b"\nevent: done\n" in frame[:48]


def parse(stream: bytes | str) -> list[dict[str, str]]:
    """Parse SSE text into events (``id``, ``event``, ``data``); comments are skipped.

    Used by tests and tools; follows the WHATWG rules for the fields used here:
    a block without ``data`` (the ``retry: 1000`` that opens a stream) is no event.
    """
    text = stream.decode() if isinstance(stream, bytes) else stream
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    data: list[str] = []
    for line in _LINE_BREAKS.split(text):
        if not line:
            if data:
                current["data"] = "\n".join(data)
                events.append(current)
            current, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event", "retry"):
            current[name] = value
    return events
