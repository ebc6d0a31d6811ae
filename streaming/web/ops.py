"""Operations routes: liveness, readiness, Prometheus metrics, the chat page."""

from __future__ import annotations

from pathlib import Path

import redis
from flask import Blueprint, Response, jsonify, send_from_directory

from streaming import metrics
from streaming.web.context import sluice
from streaming.web.errors import redis_unavailable

__all__ = ["bp"]

WEB_DIR = Path(__file__).parent / "static"

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health() -> Response:
    return jsonify(status="ok")


@bp.get("/metrics")
def prometheus() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.get("/ready")
def ready() -> Response:
    try:
        sluice().redis.ping()
    except redis.RedisError:
        sluice().gate.failed()
        return redis_unavailable()
    sluice().gate.recovered()
    return jsonify(status="ready")


@bp.get("/")
def index() -> Response:
    return send_from_directory(WEB_DIR, "index.html")


@bp.get("/static/<path:name>")
def static_file(name: str) -> Response:
    """The page's own files (streaming/web/static: vendored libraries, scripts)."""
    return send_from_directory(WEB_DIR, name)
