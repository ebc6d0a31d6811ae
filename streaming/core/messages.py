"""Chat messages as OpenAI defines them: the text they carry.

A message's ``content`` is a string, an array of parts (``{"type": "text",
"text": ...}``, image parts, ...) or null. `text_length` counts what is text:
string contents and the ``text`` of text parts (``MAX_PROMPT_CHARS`` and the
estimated usage count this).
"""

from __future__ import annotations

from typing import Any

__all__ = ["content_length", "text_length"]


def content_length(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def text_length(messages: list[dict[str, Any]]) -> int:
    """The characters of text in `messages`."""
    return sum(content_length(m.get("content")) for m in messages)
