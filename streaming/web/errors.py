"""The one JSON error shape of the API, and the handlers that guarantee it.

Every error response is ``{"error": {"code": "...", "message": "..."}}`` with
its HTTP status; no HTML page, no stack trace, on any route. A 4xx without a
code of its own (416 for a ``Range`` on the page, 408, ...) is
``invalid_request``, never ``internal_error``; an error status that a view or
werkzeug produced with another body (the page's 412 for a failed ``If-Match``)
is replaced by the JSON shape on its way out.
"""

from __future__ import annotations

import logging
import math
import time

import redis
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES

from streaming import metrics
from streaming.core.exceptions import (
    BudgetExhausted,
    NotFound,
    SessionBusy,
    StreamingError,
    TooManyStreams,
)

__all__ = ["ApiError", "error_response", "install_error_handlers", "redis_unavailable"]

logger = logging.getLogger(__name__)

_CORE_STATUS = {TooManyStreams: 429, BudgetExhausted: 429, SessionBusy: 409, NotFound: 404}

_HTTP_CODES = {
    400: ("invalid_request", None),
    401: ("unauthorized", "A valid bearer key is required."),
    404: ("not_found", "Not found."),
    405: ("method_not_allowed", "Method not allowed."),
    413: ("payload_too_large", "The request body is too large."),
    415: ("unsupported_media_type", "The body must be application/json."),
    429: ("rate_limited", "Too many requests."),
}


def _code_for(status: int) -> tuple[str, str | None]:
    """The API code (and fixed message, if any) of an HTTP error status."""
    if status in _HTTP_CODES:
        return _HTTP_CODES[status]
    return ("invalid_request", None) if 400 <= status < 500 else ("internal_error", None)


class ApiError(Exception):
    """Raised anywhere in a view to answer with the JSON error shape."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    response = jsonify(error={"code": code, "message": message})
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def redis_unavailable() -> Response:
    return error_response(503, "redis_unavailable", "The data store is unavailable.")


def install_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        if exc.status == 429:
            metrics.LIMIT_REJECTIONS.labels(exc.code).inc()
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(StreamingError)
    def _refused(exc: StreamingError) -> Response:
        # the streaming core's refusals, mapped to their statuses here and only here
        status = _CORE_STATUS.get(type(exc), 500)
        if status == 429:
            metrics.LIMIT_REJECTIONS.labels(exc.code).inc()
        headers = {}
        if isinstance(exc, BudgetExhausted):  # until the budget resets (the UTC day ends)
            headers["Retry-After"] = str(max(1, math.ceil(exc.resets_at - time.time())))
        return error_response(status, exc.code, exc.message, headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code, message = _code_for(status)
        if status == 400 and message is None:
            message = "The request could not be understood."
        headers = dict(exc.get_headers()) if status == 405 else {}
        headers.pop("Content-Type", None)
        return error_response(status, code, message or exc.name, headers)

    @app.after_request
    def _json_errors_only(response: Response) -> Response:
        # Registered first, so it runs last. E.g. werkzeug's conditional answer to
        # a failed If-Match on the page keeps the page as the body of its 412.
        status = response.status_code
        if status < 400 or response.mimetype == "application/json":
            return response
        code, message = _code_for(status)
        return error_response(status, code, message or HTTP_STATUS_CODES.get(status, "Error."))

    @app.errorhandler(redis.RedisError)
    def _redis_down(exc: redis.RedisError) -> Response:
        logger.warning("redis unavailable: %s", exc.__class__.__name__)
        app.extensions["sluice"].gate.failed()
        return redis_unavailable()

    @app.before_request
    def _fail_fast() -> Response | None:
        # registered before the rate limiter's hook, which would wait on Redis too
        if request.path.startswith(("/api/", "/v1/")) and app.extensions["sluice"].gate.is_open():
            return redis_unavailable()
        return None

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # Policy: log the trace server-side, answer the typed 500 without details.
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "Internal server error.")
