"""What every blueprint shares: the caller's identity, SSE responses, the client watch.

- `authenticated(bp)` puts the one authentication hook on a blueprint: it
  sets ``g.owner`` (`streaming.web.context.authenticate`) before any view runs
  (a CORS preflight, ``OPTIONS``, needs no credential), and the limit on failed
  authentications per client IP (`streaming.web.limits.auth_failure_limit`).
- `limit_client()` is who limits and slots count against: the owner in
  authenticated mode, else the client IP (`streaming.web.limits.client_ip`).
- `sse_response` is every event-stream answer, with its headers in one place;
  on ``/api`` it begins with ``retry: 1000`` (API.md section 6: a browser
  `EventSource` reconnects within a second); ``/v1`` stays OpenAI's format.
- `start_generation` validates a completion body (ours, or /v1's translated)
  and starts it for the caller (`streaming.core.service.start`).
- `client_watch` watches the request's client socket (and gives it a send
  timeout), for the followers of `streaming.core.follow`.
"""

from __future__ import annotations

from collections.abc import Iterable

from flask import Blueprint, Response, g, request

from streaming.core import service
from streaming.core.follow import ClientWatch
from streaming.core.generation import Generation
from streaming.sse import RETRY
from streaming.web.context import authenticate, sluice
from streaming.web.limits import auth_failure_limit, client_ip
from streaming.web.validation import parse_completion

__all__ = [
    "authenticated",
    "client_watch",
    "limit_client",
    "sse_response",
    "start_generation",
]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _authenticate() -> None:
    if request.method == "OPTIONS":  # a CORS preflight never needs a credential
        return
    g.owner = authenticate(request, sluice().settings)


def authenticated(bp: Blueprint) -> Blueprint:
    bp.before_request(_authenticate)
    auth_failure_limit(bp)
    return bp


def limit_client() -> str:
    return g.owner if sluice().settings.authenticated else client_ip()


class _Prefixed:
    """A WSGI body that sends `first` with the first chunk of `body` (and closes `body`).

    In one write with it, not in a write of its own: a second small write right
    behind the first waits for the client's delayed ACK (Nagle), which slowed the
    first event of every stream. A few bytes per stream.
    """

    __slots__ = ("_first", "_body")

    def __init__(self, first: bytes, body: Iterable[bytes]):
        self._first: bytes | None = first
        self._body = body

    def __iter__(self) -> _Prefixed:
        return self

    def __next__(self) -> bytes:
        first = self._first
        if first is not None:
            self._first = None
            try:
                return first + next(self._body)
            except StopIteration:
                return first
        return next(self._body)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()


def sse_response(body: Iterable[bytes], stream_id: str) -> Response:
    if request.path.startswith("/api/"):
        body = [RETRY, *body] if isinstance(body, list) else _Prefixed(RETRY, iter(body))
    return Response(
        body,
        status=200,
        content_type="text/event-stream",
        headers={**SSE_HEADERS, "X-Stream-ID": stream_id},
        # The body goes to gunicorn as it is (bytes only; gunicorn calls its close()):
        # no werkzeug wrapping layers on every parked stream (~3.6 KB each).
        direct_passthrough=True,
    )


def client_watch() -> ClientWatch:
    """The client socket watch (and send timeout) for the current request."""
    return ClientWatch(
        request.environ.get("gunicorn.socket"), sluice().settings.send_timeout_seconds
    )


def start_generation(body: dict) -> Generation:
    """Validate a completion body (ours, or /v1's translated), then start it for this caller."""
    app = sluice()
    settings = app.settings
    parsed, messages, model = parse_completion(
        body,
        allowed_models=settings.models,
        default_model=settings.llm_model,
        max_prompt_chars=settings.max_prompt_chars,
    )
    surface = "v1" if request.blueprint == "openai_compat" else "api"
    return service.start(app.manager, parsed, messages, model, g.owner, limit_client(), surface)
