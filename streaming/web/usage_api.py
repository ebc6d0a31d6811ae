"""GET /api/v1/usage: the caller's usage today and its daily token budget.

Thin: the caller is the client its limits count against (`views.limit_client`:
the key's owner in authenticated mode, the IP in open mode); the figures are
`streaming.core.usage.Usage.read`'s.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, jsonify

from streaming.web.context import sluice
from streaming.web.limits import default_limit
from streaming.web.views import authenticated, limit_client

__all__ = ["bp"]

bp = authenticated(Blueprint("usage", __name__, url_prefix="/api/v1"))
default_limit(bp)


@bp.get("/usage")
def usage() -> Response:
    return jsonify(sluice().manager.usage.read(limit_client(), time.time()))
