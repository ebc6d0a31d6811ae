"""Browser sign-in sessions in Redis (API.md section 2), no Flask.

A sign-in is an opaque random cookie value (256 bits); Redis keeps, under
``keys.signin(sha256(value))``, the owner it stands for, its kind ("key" or
"jwt") and when it ends, with a TTL of the same length: the value itself is
never stored, so a read of Redis cannot be replayed as a cookie. One SET
creates it, one GET reads it on every cookie-authenticated request (no
per-worker cache: a DELETE revokes it at once on every worker and host), one
DEL revokes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass

import redis

from streaming.core import keys

__all__ = ["SignIn", "SignInStore"]

MAX_COOKIE_CHARS = 128  # token_urlsafe(32) is 43; anything far longer is not ours


@dataclass(frozen=True)
class SignIn:
    owner: str
    kind: str
    expires: int  # epoch seconds


def _key(value: str) -> str:
    return keys.signin(hashlib.sha256(value.encode()).hexdigest())


class SignInStore:
    def __init__(self, client: redis.Redis):
        self.redis = client

    def create(self, owner: str, kind: str, ttl: float, now: float) -> tuple[str, SignIn]:
        """A new sign-in for `owner` lasting `ttl` seconds (> 0): (cookie value, sign-in)."""
        seconds = max(1, math.floor(ttl))
        value = secrets.token_urlsafe(32)
        signin = SignIn(owner, kind, int(now) + seconds)
        record = {"owner": owner, "kind": kind, "expires": signin.expires}
        self.redis.set(_key(value), json.dumps(record), ex=seconds)
        return value, signin

    def get(self, value: str) -> SignIn | None:
        if not value or len(value) > MAX_COOKIE_CHARS:
            return None
        raw = self.redis.get(_key(value))
        if raw is None:
            return None
        record = json.loads(raw)
        return SignIn(record["owner"], record["kind"], int(record["expires"]))

    def revoke(self, value: str) -> None:
        if value and len(value) <= MAX_COOKIE_CHARS:
            self.redis.delete(_key(value))
