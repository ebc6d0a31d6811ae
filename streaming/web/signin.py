"""Browser sign-in: ``/api/v1/auth/session`` (API.md section 2), for pages whose
`EventSource` cannot carry an Authorization header.

- ``POST`` with ``Authorization: Bearer <key or jwt>``: ``204`` and the cookie
  ``sluice_session=<opaque>; HttpOnly; SameSite=Strict; Path=/`` (``Secure``
  when the request came over HTTPS, as the trusted proxy's
  ``X-Forwarded-Proto`` tells through ProxyFix). The sign-in is kept in Redis
  (`streaming.web.signin_store`) for ``AUTH_SESSION_TTL_SECONDS``, never past
  a JWT's ``exp`` (no leeway: a token already past it cannot sign in).
- ``GET`` with the cookie: ``200 {"owner_kind", "expires"}``; else ``401``
  (and a stale cookie is cleared).
- ``DELETE`` with the cookie: revoked (one DEL; every worker and host reads
  Redis on every request, so it ends everywhere at once), the cookie cleared,
  ``204``. Cookie-authenticated, so its Origin is checked like any write.
- Open mode: ``404`` (nothing to sign in to; the page hides its sign-in).

Whoever signs in is limited like any request (`limits.default_limit`, per
owner) and a failed sign-in counts as a failed authentication.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify, request
from werkzeug.http import dump_cookie

from streaming.web.context import COOKIE, bearer, sluice, unauthorized
from streaming.web.errors import ApiError
from streaming.web.limits import auth_failure_limit, default_limit
from streaming.web.origin import origin_allowed
from streaming.web.tokens import InvalidCredential

__all__ = ["bp"]

bp = Blueprint("signin", __name__, url_prefix="/api/v1/auth")
default_limit(bp)
auth_failure_limit(bp)


@bp.before_request
def _authenticated_mode_only() -> None:
    if request.method != "OPTIONS" and not sluice().settings.authenticated:
        raise ApiError(404, "not_found", "Sign-in is used in authenticated mode only.")


def _set_cookie(response: Response, value: str) -> None:
    response.set_cookie(
        COOKIE, value, httponly=True, samesite="Strict", path="/", secure=request.is_secure
    )


def _cleared_cookie() -> str:
    return dump_cookie(
        COOKIE,
        "",
        max_age=0,
        expires=0,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.is_secure,
    )


@bp.post("/session")
def sign_in() -> Response:
    app = sluice()
    token = bearer(request)
    if token is None:
        raise unauthorized("Sign in with Authorization: Bearer <key or token>.")
    try:
        identity = app.credentials.verify(token)
    except InvalidCredential:
        raise unauthorized() from None
    now = time.time()
    ttl: float = app.settings.auth_session_ttl_seconds
    if identity.expires is not None:
        ttl = min(ttl, identity.expires - now)  # the token's own exp, without leeway
        if ttl < 1:
            raise unauthorized("The token has expired.")
    value, _ = app.signins.create(identity.owner, identity.kind, ttl, now)
    response = Response(status=204)
    _set_cookie(response, value)
    return response


@bp.get("/session")
def current() -> Response:
    value = request.cookies.get(COOKIE)
    signin = sluice().signins.get(value) if value else None
    if signin is None:
        error = unauthorized("Not signed in.")
        if value:  # expired or revoked: the browser forgets it (so it is counted once)
            error.headers["Set-Cookie"] = _cleared_cookie()
        raise error
    return jsonify(owner_kind=signin.kind, expires=signin.expires)


@bp.delete("/session")
def sign_out() -> Response:
    value = request.cookies.get(COOKIE)
    if not value:
        raise unauthorized("Not signed in.")
    if not origin_allowed(request, sluice().settings.cors_origins):
        raise ApiError(
            403,
            "forbidden_origin",
            "Signing out must come from this site's own origin or one listed in CORS_ORIGINS.",
        )
    sluice().signins.revoke(value)
    response = Response(status=204)
    response.headers["Set-Cookie"] = _cleared_cookie()
    return response
