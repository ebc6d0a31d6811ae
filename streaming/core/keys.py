"""Redis keys and channels: every one of them, and the hash tag each one carries.

One place, so a layout change is one edit. The layout is Redis Cluster-safe
(API.md §13): the keys that one command, one script or one XREAD touches
together carry the same hash tag ``{...}``, so they live in one slot; on a
single Redis (``redis://``, ``unix://``, Sentinel) the tags are harmless.
docs/DEPLOY.md ("Redis Cluster") states the layout and its reasons.

Streams: by shard. A stream id (``st_`` + 32 random hex digits) carries its
shard in its first hex digit, so nothing needs to be stored to find it. Each
of the `SHARDS` shards has one fixed tag (`SHARD_TAGS`, chosen so that their
slots lie 1/16 of the slot space apart: an evenly split cluster gets an even
share of shards on every master). For stream S of shard k, tag T = SHARD_TAGS[k]:

- ``stream:{T}S``  the registry entry (hash; see `streaming.core.registry`)
- ``events:{T}S``  the event log (Redis stream; see `streaming.core.eventlog`)
- ``cancel:{T}S``  the cancel flag set by DELETE
- ``watch:{T}S``   set by followers on other workers while they follow S
- channels ``cancel:{T}`` (stream ids to stop) and ``ack:{T}`` ("S reason" once a
  cancelled stream ended): `streaming.core.cancelbus`, sharded pub/sub on a cluster

Why by shard and not by owner: one API key may serve a whole product, and the
streams of one owner must not all land on one master; the shard is random. Why
not one tag per stream: a worker follows the logs of many streams with one
blocking ``XREAD`` per shard (`streaming.core.logreader`), and XREAD's keys
must share a slot.

Clients (C: an IP, or an owner in authenticated mode), tag ``{c:C}``:

- ``slots:{c:C}``         concurrency slots (sorted set; see `streaming.core.slots`)
- ``usage:{c:C}:D``       C's usage on UTC day D (``YYYY-MM-DD``; see `streaming.core.usage`)
- ``counted:{c:C}:S``     stream S's usage was counted (the count's once-only mark)

Sessions (S a session id), tag ``{S}``: ``session:{S}``, ``session:{S}:messages``,
``session:{S}:live`` (see `streaming.core.sessions`); and ``sessions:O`` (owner
O's list, used alone). ``worker:W`` (liveness of worker W) is used alone too.

For upstream U (a name of UPSTREAMS_FILE, or ``default``):

- ``upstream:{U}:breaker``  U's circuit breaker (hash; see `streaming.upstream.breaker`);
  U's keys share the hash tag ``{U}``

For a browser sign-in whose cookie value has digest H (the value itself is never stored):

- ``signin:H``  the sign-in session (string, JSON; see `streaming.web.signin_store`)

Rate limits are flask-limiter's, under ``sluice:rl`` (`streaming.web.limits`):
one key per counter, each command on one key.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "SHARDS",
    "SHARD_TAGS",
    "ack_channel",
    "breaker",
    "cancel_channel",
    "cancel_flag",
    "counted",
    "events",
    "registry",
    "session",
    "sessions",
    "shard",
    "shard_channels",
    "signin",
    "slots",
    "usage",
    "watch",
    "worker",
]

SHARDS = 16
# Shard k's tag; its CRC16 slot is in [k * 1024, k * 1024 + 300) (tests/test_unit_keys.py).
SHARD_TAGS = (
    "021",
    "131",
    "2179",
    "311",
    "461",
    "571",
    "68",
    "751",
    "850",
    "940",
    "a29",
    "b60",
    "c110",
    "d120",
    "e69",
    "f20",
)


def shard(stream_id: str) -> int:
    """The stream's shard: the first hex digit of its random part (``st_`` + 32 hex)."""
    digit = stream_id[3:4]
    return int(digit, 16) if digit and digit in "0123456789abcdef" else 0


def _stream_tag(stream_id: str) -> str:
    return "{" + SHARD_TAGS[shard(stream_id)] + "}"


def registry(stream_id: str) -> str:
    return f"sluice:stream:{_stream_tag(stream_id)}{stream_id}"


def events(stream_id: str) -> str:
    return f"sluice:events:{_stream_tag(stream_id)}{stream_id}"


def cancel_flag(stream_id: str) -> str:
    return f"sluice:cancel:{_stream_tag(stream_id)}{stream_id}"


def watch(stream_id: str) -> str:
    return f"sluice:watch:{_stream_tag(stream_id)}{stream_id}"


def shard_channels(k: int) -> tuple[str, str]:
    """Shard k's cancel and acknowledgement channels (one slot: one SSUBSCRIBE)."""
    tag = "{" + SHARD_TAGS[k] + "}"
    return f"sluice:cancel:{tag}", f"sluice:ack:{tag}"


def cancel_channel(stream_id: str) -> str:
    return shard_channels(shard(stream_id))[0]


def ack_channel(stream_id: str) -> str:
    return shard_channels(shard(stream_id))[1]


def worker(worker_id: str) -> str:
    return f"sluice:worker:{worker_id}"


def _client_tag(client: str) -> str:
    # A brace inside the tag would end it early (or leave it empty): such a client
    # (a JWT subject may hold anything) is tagged by a digest instead.
    if "{" in client or "}" in client:
        return "{c#" + hashlib.sha256(client.encode()).hexdigest()[:24] + "}"
    return "{c:" + client + "}"


def slots(client: str) -> str:
    return f"sluice:slots:{_client_tag(client)}"


def usage(client: str, day: str) -> str:
    """``day``: the UTC day, ``YYYY-MM-DD``."""
    return f"sluice:usage:{_client_tag(client)}:{day}"


def counted(client: str, stream_id: str) -> str:
    """Set once stream S's usage was added to C's day (same slot as ``usage``)."""
    return f"sluice:counted:{_client_tag(client)}:{stream_id}"


def session(session_id: str, part: str = "") -> str:
    """``part``: "" (the hash), ":messages" or ":live"."""
    return f"sluice:session:{{{session_id}}}{part}"


def sessions(owner: str) -> str:
    return f"sluice:sessions:{owner}"


def breaker(upstream: str) -> str:
    """``upstream``: its name (letters, digits, ``-_.``; never braces)."""
    return f"sluice:upstream:{{{upstream}}}:breaker"


def signin(digest: str) -> str:
    """``digest``: the SHA-256 of a sign-in cookie's value (hex)."""
    return f"sluice:signin:{digest}"
