"""Redis keys and channels of the stream registry, its event logs and the cancel bus.

One place, so a layout change is one edit. For stream id S (all under ``sluice:``):

- ``stream:S``  the registry entry (hash; see `streaming.core.manager`)
- ``events:S``  the event log (Redis stream; see `streaming.core.eventlog`)
- ``cancel:S``  the cancel flag set by DELETE
- ``watch:S``   set by followers on other workers while they follow S
- ``worker:W``  liveness of worker W
- channels ``sluice:cancel`` (stream ids to stop) and ``sluice:ack`` ("S reason" once
  a cancelled stream ended)

For client C (its IP, or its owner in authenticated mode), session S and owner O:

- ``slots:C``   concurrency slots (sorted set; see `streaming.core.slots`)
- ``usage:C:D`` C's usage on UTC day D (``YYYY-MM-DD``; hash; see `streaming.core.usage`)
- ``session:S``, ``session:S:messages``, ``session:S:live``, ``sessions:O``
  (see `streaming.core.sessions`)

For upstream U (a name of UPSTREAMS_FILE, or ``default``):

- ``upstream:{U}:breaker``  U's circuit breaker (hash; see `streaming.upstream.breaker`);
  U's keys share the hash tag ``{U}``

For a browser sign-in whose cookie value has digest H (the value itself is never stored):

- ``signin:H``  the sign-in session (string, JSON; see `streaming.web.signin_store`)

Rate limits are flask-limiter's, under ``sluice:rl`` (`streaming.web.limits`).
"""

from __future__ import annotations

__all__ = [
    "ACK_CHANNEL",
    "CANCEL_CHANNEL",
    "breaker",
    "cancel_flag",
    "events",
    "registry",
    "session",
    "sessions",
    "signin",
    "slots",
    "usage",
    "watch",
    "worker",
]

CANCEL_CHANNEL = "sluice:cancel"
ACK_CHANNEL = "sluice:ack"


def registry(stream_id: str) -> str:
    return f"sluice:stream:{stream_id}"


def events(stream_id: str) -> str:
    return f"sluice:events:{stream_id}"


def cancel_flag(stream_id: str) -> str:
    return f"sluice:cancel:{stream_id}"


def watch(stream_id: str) -> str:
    return f"sluice:watch:{stream_id}"


def worker(worker_id: str) -> str:
    return f"sluice:worker:{worker_id}"


def slots(client: str) -> str:
    return f"sluice:slots:{client}"


def session(session_id: str, part: str = "") -> str:
    """``part``: "" (the hash), ":messages" or ":live"."""
    return f"sluice:session:{session_id}{part}"


def sessions(owner: str) -> str:
    return f"sluice:sessions:{owner}"


def usage(client: str, day: str) -> str:
    """``day``: the UTC day, ``YYYY-MM-DD``."""
    return f"sluice:usage:{client}:{day}"


def breaker(upstream: str) -> str:
    """``upstream``: its name (letters, digits, ``-_.``; never braces)."""
    return f"sluice:upstream:{{{upstream}}}:breaker"


def signin(digest: str) -> str:
    """``digest``: the SHA-256 of a sign-in cookie's value (hex)."""
    return f"sluice:signin:{digest}"
