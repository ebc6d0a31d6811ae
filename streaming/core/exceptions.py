"""The streaming core's own errors: what went wrong, in the domain's words, with no HTTP.

The core (admission, the registry, cancel) raises these; the web layer maps
each to its status and error code of the API in one place
(`streaming.web.errors.install_error_handlers`).
"""

from __future__ import annotations

__all__ = ["BudgetExhausted", "NotFound", "SessionBusy", "StreamingError", "TooManyStreams"]


class StreamingError(Exception):
    """Base of the core's refusals; `code` is the API's error code for it."""

    code = "internal_error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TooManyStreams(StreamingError):
    """The client holds all of its concurrency slots (``MAX_CONCURRENT_STREAMS``)."""

    code = "too_many_streams"


class BudgetExhausted(StreamingError):
    """The client used its daily token budget (``TOKEN_BUDGET_DAILY``); it resets at `resets_at`."""

    code = "budget_exhausted"

    def __init__(self, message: str, resets_at: int):
        super().__init__(message)
        self.resets_at = resets_at  # epoch seconds: the end of the UTC day


class SessionBusy(StreamingError):
    """The chat session has a live generation already (one at a time per session)."""

    code = "session_busy"


class NotFound(StreamingError):
    """No such stream or session for this owner (unknown, expired or another's: alike)."""

    code = "not_found"
