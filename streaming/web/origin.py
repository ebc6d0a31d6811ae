"""The Origin check of cookie-authenticated writes (API.md section 2: cross-site request forgery).

A ``POST``/``DELETE`` (any unsafe method) authenticated by the sign-in cookie
must carry an ``Origin`` that is the request's own origin (its scheme, as the
trusted proxy's ``X-Forwarded-Proto`` tells through ProxyFix, and its
``Host``) or an origin listed by name in ``CORS_ORIGINS`` (``*`` never
counts). A missing or ``null`` Origin is refused: every browser sends one on
such requests, so only a forged or sandboxed one arrives without it.
"""

from __future__ import annotations

from flask import Request

__all__ = ["SAFE_METHODS", "origin_allowed"]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _normalized(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_allowed(request: Request, listed: tuple[str, ...]) -> bool:
    origin = request.headers.get("Origin")
    if not origin or origin.strip().lower() == "null":
        return False
    origin = _normalized(origin)
    own = _normalized(f"{request.scheme}://{request.host}")
    if origin == own:
        return True
    return any(origin == _normalized(name) for name in listed if name.strip() != "*")
