"""The per-app objects (one Redis pool, one upstream client, one StreamManager)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import redis
from flask import Request, current_app

from config.settings import Settings
from streaming.core.manager import StreamManager
from streaming.redis_conn import RedisGate
from streaming.upstream.client import Upstream
from streaming.web.errors import ApiError

__all__ = ["RedisGate", "Sluice", "authenticate", "sluice"]

PUBLIC_OWNER = "public"


@dataclass
class Sluice:
    settings: Settings
    redis: redis.Redis
    upstream: Upstream
    manager: StreamManager

    @property
    def gate(self) -> RedisGate:
        return self.manager.gate


def sluice() -> Sluice:
    return current_app.extensions["sluice"]


def authenticate(request: Request, settings: Settings) -> str:
    """The owner of what this request creates: 'public' in open mode, else the key's digest.

    Open mode ignores any Authorization header (the openai SDKs always send one).
    """
    if not settings.authenticated:
        return PUBLIC_OWNER
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() == "bearer" and key:
        given = key.strip().encode()
        matched = False
        for candidate in settings.api_keys:
            matched |= hmac.compare_digest(given, candidate.encode())
        if matched:
            return "key:" + hashlib.sha256(given).hexdigest()[:24]
    raise ApiError(
        401, "unauthorized", "A valid bearer key is required.", {"WWW-Authenticate": "Bearer"}
    )
