"""The per-app objects (one Redis pool, the upstream router, one StreamManager), and who calls.

Identity (API.md section 2). `caller()` resolves, once per request (kept in
``flask.g``), who the request comes from, and never raises (the rate limiter's
key function calls it, and flask-limiter treats any exception there as its
storage failing):

- open mode: `PUBLIC` (any Authorization header is ignored: the openai SDKs
  always send one);
- ``Authorization: Bearer <key or jwt>`` (`streaming.web.tokens.Credentials`);
- on ``/api`` routes only, without a bearer: the sign-in cookie
  (`streaming.web.signin_store`).

`authenticate()` is what the views' hook calls: the owner, or ``401
unauthorized`` (``WWW-Authenticate: Bearer``), ``403 forbidden_origin`` for a
cookie-authenticated write from another origin (`streaming.web.origin`), ``503``
when the sign-in store cannot be read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from flask import Request, current_app, g, request

from config.settings import Settings
from streaming.core.manager import StreamManager
from streaming.redis_conn import RedisGate
from streaming.upstream.routing import Router
from streaming.web.errors import ApiError
from streaming.web.origin import SAFE_METHODS, origin_allowed
from streaming.web.signin_store import SignInStore
from streaming.web.tokens import Credentials, InvalidCredential

__all__ = [
    "COOKIE",
    "PUBLIC",
    "Caller",
    "RedisGate",
    "Sluice",
    "authenticate",
    "bearer",
    "caller",
    "presented_credential",
    "sluice",
    "unauthorized",
]

PUBLIC_OWNER = "public"
COOKIE = "sluice_session"


@dataclass
class Sluice:
    settings: Settings
    redis: redis.Redis
    upstream: Router  # the upstreams, their clients and breaker (streaming.upstream.routing)
    manager: StreamManager
    credentials: Credentials = field(init=False)
    signins: SignInStore = field(init=False)

    def __post_init__(self) -> None:
        self.credentials = Credentials(self.settings)
        self.signins = SignInStore(self.redis)

    @property
    def gate(self) -> RedisGate:
        return self.manager.gate


def sluice() -> Sluice:
    return current_app.extensions["sluice"]


@dataclass(frozen=True)
class Caller:
    owner: str
    kind: str  # "public", "key" or "jwt"
    via: str  # "open", "bearer" or "cookie"
    expires: float | None = None


PUBLIC = Caller(PUBLIC_OWNER, "public", "open")


def bearer(req: Request) -> str | None:
    """The bearer value of the Authorization header (None without one)."""
    scheme, _, value = req.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def presented_credential(req: Request) -> bool:
    """Did the request carry a credential at all (a failed one counts as a failed sign-in)?"""
    return "Authorization" in req.headers or (
        req.path.startswith("/api/") and COOKIE in req.cookies
    )


def _resolve(req: Request, app: Sluice) -> Caller | None:
    if not app.settings.authenticated:
        return PUBLIC
    if "Authorization" in req.headers:
        token = bearer(req)
        if token is None:
            return None
        try:
            identity = app.credentials.verify(token)
        except InvalidCredential:
            return None
        return Caller(identity.owner, identity.kind, "bearer", identity.expires)
    if req.path.startswith("/api/") and (value := req.cookies.get(COOKIE)):
        signin = app.signins.get(value)  # RedisError: kept by caller(), raised by authenticate
        if signin is not None:
            return Caller(signin.owner, signin.kind, "cookie", signin.expires)
    return None


def caller() -> Caller | None:
    """Who this request comes from (None: no valid credential). Never raises."""
    if "caller" not in g:
        try:
            g.caller = _resolve(request, sluice())
        except redis.RedisError as err:
            g.caller, g.caller_error = None, err
    return g.caller


def unauthorized(message: str = "A valid bearer key or token is required.") -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})


def authenticate(req: Request, settings: Settings) -> str:
    """The owner of what this request creates; raises the 401 / 403 / Redis error."""
    if not settings.authenticated:
        return PUBLIC_OWNER
    who = caller()
    if who is None:
        error = g.get("caller_error")
        if error is not None:
            raise error
        raise unauthorized()
    if who.via == "cookie" and req.method not in SAFE_METHODS:
        if not origin_allowed(req, settings.cors_origins):
            raise ApiError(
                403,
                "forbidden_origin",
                "A signed-in request that changes something must come from this site's own "
                "origin or one listed in CORS_ORIGINS.",
            )
    return who.owner
