"""The /api/v1/sessions routes (thin: parse, authorize, call the SessionStore)."""

from __future__ import annotations

from flask import Blueprint, Response, g, jsonify, request

from streaming.web.context import sluice
from streaming.web.errors import ApiError
from streaming.web.limits import default_limit
from streaming.web.validation import read_json
from streaming.web.views import authenticated

__all__ = ["bp"]

bp = authenticated(Blueprint("sessions", __name__, url_prefix="/api/v1/sessions"))
default_limit(bp)

MAX_TITLE = 200


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "No such session.")


@bp.post("")
def create_session() -> tuple[Response, int]:
    title = "New chat"
    if request.content_length or request.mimetype == "application/json":
        body = read_json(request)
        raw = body.get("title", title)
        if not isinstance(raw, str) or len(raw) > MAX_TITLE:
            raise ApiError(
                400,
                "invalid_request",
                f"Invalid field 'title': a string of at most {MAX_TITLE} characters.",
            )
        title = raw.strip() or title
    return jsonify(sluice().manager.sessions.create(g.owner, title)), 201


@bp.get("/<session_id>")
def get_session(session_id: str) -> Response:
    session = sluice().manager.sessions.get(session_id, g.owner)
    if session is None:
        raise _not_found()
    return jsonify(session)


@bp.delete("/<session_id>")
def delete_session(session_id: str) -> tuple[str, int]:
    if not sluice().manager.sessions.delete(session_id, g.owner):
        raise _not_found()
    return "", 204


@bp.get("")
def list_sessions() -> Response:
    app = sluice()
    if not app.settings.authenticated:
        raise ApiError(404, "not_found", "Sessions are listed in authenticated mode only.")
    return jsonify(sessions=app.manager.sessions.list(g.owner))
