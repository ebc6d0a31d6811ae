"""Request bodies: a read deadline, and typed errors for malformed ones (WSGI middleware).

gunicorn's gevent worker bounds the wait for a request head, never for its
body: a client that sends a head and then stalls its body holds its
connection (and its greenlet) for as long as it likes, and enough of them
keep every other request, ``/health`` included, from being accepted. nginx
drops such bodies after ``client_body_timeout`` (10 s), but gunicorn may be
reachable without nginx.

`BodyDeadline` wraps ``environ["wsgi.input"]`` of every request that has a
body: each read runs under a `gevent.Timeout` for what is left of
`BODY_SECONDS`, counted from the moment the head was parsed, so a body sent
one byte at a time cannot stretch it either. A read past the deadline raises
``ApiError(408, "invalid_request")``; a read that gunicorn's parser refuses
(bad chunk size or extension, missing chunk terminator, bad trailer: its
``ParseException``s, which Flask would otherwise answer with a 500) or that
meets an early end of the body raises ``ApiError(400, "invalid_request")``.
The view that reads the body (``request.get_data()``) answers with it, in the
API's JSON shape. A body nobody reads costs nothing: gunicorn discards it
after the response within its keep-alive timeout.

A chunk size larger than any allowed body (say 19 hex digits) is not an error
to gunicorn's parser: it waits for that many bytes, so such a request gets the
408 at the deadline (behind nginx it is nginx's own 400).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent

from streaming.web.errors import ApiError

__all__ = ["BODY_SECONDS", "BodyDeadline", "DeadlineInput"]

logger = logging.getLogger(__name__)

BODY_SECONDS = 10.0  # = nginx.conf's client_body_timeout


def _has_body(environ: dict[str, Any]) -> bool:
    if environ.get("HTTP_TRANSFER_ENCODING"):
        return True
    length = environ.get("CONTENT_LENGTH") or "0"
    return length != "0"


class DeadlineInput:
    """A ``wsgi.input`` whose reads all end within `seconds` from now."""

    __slots__ = ("_stream", "_deadline", "_seconds")

    def __init__(self, stream: Any, seconds: float):
        self._stream = stream
        self._seconds = seconds
        self._deadline = time.monotonic() + seconds

    def _call(self, read: Callable[..., Any], *args: Any) -> Any:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self._too_slow()
        timer = gevent.Timeout(remaining)
        timer.start()
        try:
            return read(*args)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            # A timeout (a BaseException) escapes gunicorn's own bookkeeping: mark its body
            # failed as its parse errors do, so the connection closes after our answer
            # instead of draining the rest of a body that is not coming.
            if hasattr(self._stream, "failed"):
                self._stream.failed = True
            raise self._too_slow() from None
        except OSError as exc:  # the client went away mid-body (gunicorn's NoMoreData)
            logger.info("request body ended early: %s", exc.__class__.__name__)
            raise ApiError(
                400, "invalid_request", "The request body ended before its declared end."
            ) from None
        except Exception as exc:  # gunicorn's ParseException family: a malformed body
            logger.info("malformed request body: %s", exc.__class__.__name__)
            raise ApiError(
                400,
                "invalid_request",
                "The request body is malformed (bad chunked transfer encoding).",
            ) from None
        finally:
            timer.close()

    def read(self, size: int | None = -1) -> bytes:
        return self._call(self._stream.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._call(self._stream.readline, size)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return self._call(self._stream.readlines, hint)

    def _too_slow(self) -> ApiError:
        return ApiError(
            408,
            "invalid_request",
            f"The request body did not arrive within {self._seconds:g} seconds.",
        )

    def __iter__(self) -> DeadlineInput:
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line


class BodyDeadline:
    """WSGI middleware: every request body must arrive within `seconds` of its head."""

    def __init__(self, app: Callable[..., Iterable[bytes]], seconds: float = BODY_SECONDS):
        self.app = app
        self.seconds = seconds

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        stream = environ.get("wsgi.input")
        if stream is not None and _has_body(environ):
            environ["wsgi.input"] = DeadlineInput(stream, self.seconds)
        return self.app(environ, start_response)
