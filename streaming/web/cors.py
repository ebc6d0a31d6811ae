"""CORS for a front end on another origin (API.md section 2), through flask-cors.

``CORS_ORIGINS`` lists the origins allowed to call ``/api`` and ``/v1`` from a
browser. flask-cors answers the preflight (``OPTIONS``: methods ``GET, POST,
DELETE``, headers ``Authorization, Content-Type, Last-Event-ID,
X-Session-ID``), exposes ``X-Stream-ID``, ``Retry-After`` and the
``X-RateLimit-*`` headers, echoes a listed Origin (``Vary: Origin``) and
sends no ``Access-Control-Allow-Origin`` to an unlisted one.

Credentials are for origins listed by name only, never for ``*`` (any origin,
bearer tokens only). flask-cors's ``supports_credentials`` is one switch per
resource, not per origin, so: without ``*`` it is simply on; with ``*`` it is
off, and `_credentials_for_listed` adds ``Access-Control-Allow-Credentials``
for an Origin listed by name. `_preflight_204` answers a preflight that
flask-cors allowed with ``204 No Content`` (Flask's automatic ``OPTIONS``
answer is a 200 with an Allow header). Preflights need no credential
(`streaming.web.views.authenticated`) and count against no rate limit.
"""

from __future__ import annotations

import re

from flask import Flask, Response, request
from flask_cors import CORS

__all__ = ["ALLOW_HEADERS", "EXPOSE_HEADERS", "METHODS", "init_cors"]

METHODS = ["GET", "POST", "DELETE"]
ALLOW_HEADERS = ["Authorization", "Content-Type", "Last-Event-ID", "X-Session-ID"]
EXPOSE_HEADERS = [
    "X-Stream-ID",
    "Retry-After",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
]
MAX_AGE = 600


def _exactly(origin: str) -> str | re.Pattern[str]:
    """An origin matched exactly: flask-cors takes a string with regex characters (an
    IPv6 ``[::1]``) for a regex, so such a name goes in compiled and escaped."""
    if set(origin).isdisjoint("*\\]?$^[]()"):
        return origin
    return re.compile(re.escape(origin) + r"\Z", re.IGNORECASE)


def init_cors(app: Flask, origins: tuple[str, ...]) -> None:
    if not origins:
        return
    named = {o.rstrip("/").lower() for o in origins if o != "*"}
    wildcard = "*" in origins
    options = {
        "origins": [*(_exactly(o) for o in sorted(named)), *([r".*"] if wildcard else [])],
        "methods": METHODS,
        "allow_headers": ALLOW_HEADERS,
        "expose_headers": EXPOSE_HEADERS,
        "supports_credentials": not wildcard,
        "send_wildcard": False,
        "vary_header": True,
        "max_age": MAX_AGE,
    }

    # after_request hooks run in reverse order of registration: these run after flask-cors's
    @app.after_request
    def _preflight_204(response: Response) -> Response:
        if (
            request.method == "OPTIONS"
            and "Access-Control-Allow-Methods" in response.headers
            and response.status_code == 200
        ):
            response.status_code = 204
            response.set_data(b"")
            response.headers.pop("Content-Type", None)
        return response

    if wildcard and named:

        @app.after_request
        def _credentials_for_listed(response: Response) -> Response:
            origin = (request.headers.get("Origin") or "").rstrip("/").lower()
            if origin in named and response.headers.get("Access-Control-Allow-Origin"):
                response.headers["Access-Control-Allow-Credentials"] = "true"
            return response

    CORS(app, resources={r"/api/*": options, r"/v1/*": options})
