"""Chat sessions in Redis: a title, an owner and the message history.

Keys, for session id S (all three tagged ``{S}``: one Redis Cluster slot):
``session:{S}`` (hash: owner, title, created), ``session:{S}:messages`` (list
of JSON messages, oldest first, trimmed to ``SESSION_MAX_MESSAGES``),
``session:{S}:live`` (the stream id generating in it now), and
``sessions:<owner>`` (sorted set, listing in authenticated mode; written as a
second step: a session whose listing failed expires unlisted). Every use
refreshes the TTL (``SESSION_TTL_SECONDS``), so idle sessions expire and
active ones survive restarts of every worker.

One stream at a time per session: a second stream on a session with a live
one gets 409 ``session_busy`` (two answers written into one history at once
would interleave). The live marker is a lease renewed by the owning worker
and released in the generation's ``finally``, where the turn is saved: the
new messages and the reply, marked ``"interrupted": true`` when the stream
ended other than by ``stop`` or ``length``.
"""

from __future__ import annotations

import json
import secrets
import time

import redis

from streaming.core import keys
from streaming.redis_conn import script

__all__ = ["SessionStore", "new_session_id", "valid_session_id"]

_HEX = frozenset("0123456789abcdef")
_RELEASE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def new_session_id() -> str:
    return "se_" + secrets.token_hex(16)


def valid_session_id(session_id: str) -> bool:
    return len(session_id) == 35 and session_id.startswith("se_") and set(session_id[3:]) <= _HEX


class SessionStore:
    def __init__(self, redis_client: redis.Redis, ttl: int, max_messages: int):
        self.redis = redis_client
        self.ttl = ttl
        self.max_messages = max_messages

    def create(self, owner: str, title: str) -> dict:
        session_id, created = new_session_id(), int(time.time())
        # Two slots (the session's, the owner's list): the session first; when the
        # listing fails the 503 never gave its id out, and it expires unlisted.
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            keys.session(session_id), mapping={"owner": owner, "title": title, "created": created}
        )
        pipe.expire(keys.session(session_id), self.ttl)
        pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.sessions(owner), {session_id: created})
        pipe.expire(keys.sessions(owner), self.ttl)
        pipe.execute()
        return {"session_id": session_id, "title": title, "created": created}

    def meta(self, session_id: str, owner: str) -> dict | None:
        """The session's title and creation time, or None if unknown, expired or not owned."""
        if not valid_session_id(session_id):
            return None
        raw = self.redis.hgetall(keys.session(session_id))
        if not raw or raw.get(b"owner", b"").decode() != owner:
            return None
        return {
            "session_id": session_id,
            "title": raw[b"title"].decode(),
            "created": int(raw[b"created"]),
        }

    def get(self, session_id: str, owner: str) -> dict | None:
        meta = self.meta(session_id, owner)
        if meta is None:
            return None
        self._touch(session_id)
        return {**meta, "messages": self.messages(session_id)}

    def messages(self, session_id: str) -> list[dict]:
        return [
            json.loads(m) for m in self.redis.lrange(keys.session(session_id, ":messages"), 0, -1)
        ]

    def history(self, session_id: str) -> list[dict[str, str]]:
        """What goes upstream before the new message: role and content only."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages(session_id)]

    def delete(self, session_id: str, owner: str) -> bool:
        if self.meta(session_id, owner) is None:
            return False
        # The history goes first (one slot); a listing left behind by a failed ZREM
        # is skipped by `list` (its session is gone) and expires.
        self.redis.delete(keys.session(session_id), keys.session(session_id, ":messages"))
        self.redis.zrem(keys.sessions(owner), session_id)
        return True

    def list(self, owner: str) -> list[dict]:
        ids = [i.decode() for i in self.redis.zrevrange(keys.sessions(owner), 0, 199)]
        found = [self.meta(i, owner) for i in ids]
        return [m for m in found if m is not None]

    # -- one live stream per session -------------------------------------------------

    @staticmethod
    def live_key(session_id: str) -> str:
        """The session's lease: the stream generating in it (taken by the manager's admission)."""
        return keys.session(session_id, ":live")

    def renew(self, pipe: redis.client.Pipeline, session_id: str, stream_id: str, lease: int):
        pipe.set(self.live_key(session_id), stream_id, ex=lease)  # SET: survives a Redis restart

    def save_turn(
        self,
        pipe: redis.client.Pipeline,
        session_id: str,
        new_messages: list[dict],
        reply: str,
        interrupted: bool,
    ) -> None:
        """Append the turn and release the live marker (in the generation's final pipeline)."""
        now = int(time.time())
        entries = [json.dumps({**m, "created": now}) for m in new_messages]
        answer = {"role": "assistant", "content": reply, "created": now}
        if interrupted:
            answer["interrupted"] = True
        entries.append(json.dumps(answer))
        key = keys.session(session_id, ":messages")
        pipe.rpush(key, *entries)
        pipe.ltrim(key, -self.max_messages, -1)
        pipe.expire(key, self.ttl)
        pipe.expire(keys.session(session_id), self.ttl)
        pipe.delete(self.live_key(session_id))

    def release_if_held(self, pipe: redis.client.Pipeline, session_id: str, stream_id: str):
        """Drop the live marker only if this stream still holds it."""
        script(pipe, _RELEASE_IF_HELD, [self.live_key(session_id)], [stream_id])

    def _touch(self, session_id: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.expire(keys.session(session_id), self.ttl)
        pipe.expire(keys.session(session_id, ":messages"), self.ttl)
        pipe.execute()
