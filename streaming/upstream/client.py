"""The upstream: any OpenAI-compatible API, through the official openai SDK.

The SDK's typed stream costs ~250 µs of CPU per chunk, so the request goes
through the SDK's raw-response route (``client.post(..., cast_to=httpx.Response,
stream=True)``, its documented way to call an endpoint yourself) and the SSE
lines are parsed here (a few µs per chunk). Every failure becomes an
`UpstreamError` whose code is one of the error codes of the API:
``upstream_error``, ``upstream_timeout`` or ``upstream_rate_limited``. Sluice
never retries: the SDK's retries are off, so a client sees an upstream failure
at once and is never billed twice.

A stream that ends without a ``finish_reason`` and without ``[DONE]`` was
cut off (a dropped connection can look like a clean end to a line reader):
that is an ``upstream_error`` too.

Deltas. A choice whose delta is ``{"content": ...}`` alone (and no
``logprobs``) is the fast path: its text joins the read's text, two dict
look-ups and a ``len`` per chunk. Anything else (``tool_calls`` fragments,
``refusal``, ``logprobs``, a role, fields a provider adds) goes through
`UpstreamStream._mixed`: its content still joins the text; the rest is kept,
raw, only when the stream relays deltas (``/v1`` generations: `extras` is a
list), in `extras`, in order with the text around it (a read that has any
returns its text there too, and "" from `iter_text`). ``finish_reason`` is
kept as given.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import httpcore2
import httpx2
import openai

from streaming.upstream import net
from streaming.upstream.net import ChunkedBody, PacedStream
from streaming.upstream.transport import UpstreamTransport

__all__ = ["Upstream", "UpstreamError", "UpstreamStream"]

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"  # the openai SDK's, when none is set


class UpstreamError(Exception):
    """An upstream failure; `retryable`: the upstream is down or overloaded (a connection
    failure, a 5xx, a 429, no head in time, a broken stream), so another upstream may
    serve the request (section 11); a 4xx it answered (the request's fault) is not."""

    def __init__(self, code: str, message: str, retryable: bool = True):
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable


def _status_error(exc: openai.APIStatusError) -> UpstreamError:
    if exc.status_code == 429:
        return UpstreamError("upstream_rate_limited", "The model provider is rate limiting.")
    message = f"The model provider answered HTTP {exc.status_code}."
    body = exc.body
    if exc.status_code in (400, 422) and isinstance(body, dict):
        # a request it refused (a forwarded field it does not take): say why, as it said it
        detail = body.get("message")
        if isinstance(detail, str) and detail:
            message = f"The model provider answered HTTP {exc.status_code}: {detail[:300]}"
    return UpstreamError("upstream_error", message, retryable=exc.status_code >= 500)


_OPTIONS: Any = {"headers": {"Accept-Encoding": "identity"}}
_NO_DELTA: dict[str, Any] = {}  # never written to
_NOT_RELAYED = ("content", "role")  # the text travels as text; the role is the start's


class Upstream:
    """One SDK client (one connection pool) per app."""

    def __init__(self, base_url: str | None, api_key: str, timeout: float):
        # No read timeout on the socket: gevent would arm a Timeout on every wait
        # for the next chunk (~7 % of the relay CPU). Upstream silence is caught
        # by the manager's watchdog instead, one timer per worker.
        self.timeout = httpx2.Timeout(timeout, connect=min(timeout, 10.0), read=None)
        # Few idle connections: the pool probes every idle socket on each request
        # and release (a poll per socket), which costs more than a new TCP
        # connection once there are hundreds.
        # The transport (see streaming.upstream.transport): httpx's documented custom
        # transport over an httpcore pool with our network backend, whose idle-connection
        # checks do not yield to gevent (streaming.upstream.net); it applies the
        # environment's proxies (HTTPS_PROXY, NO_PROXY, ...) itself.
        self.transport = UpstreamTransport(
            base_url or DEFAULT_BASE_URL, max_keepalive_connections=20
        )
        self.network = self.transport.network
        self.client = openai.OpenAI(
            base_url=base_url,
            api_key=api_key,
            max_retries=0,
            timeout=self.timeout,
            http_client=openai.DefaultHttpxClient(timeout=self.timeout, transport=self.transport),
        )

    def open(
        self,
        model: str,
        messages: list[dict[str, Any]],
        relay_deltas: bool = False,
        stream_options: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        head_timeout: float | None = None,
        **fields: Any,
    ) -> UpstreamStream:
        """Send the request; returns once the response head arrived.

        Through ``client.post`` with ``cast_to=httpx.Response``: the SDK still builds,
        authenticates and sends the request, maps HTTP errors to its exceptions and
        hands back the unread response; it skips ``create()``'s TypedDict transform of
        the parameters (an identity for validated text messages, 31 % of a short
        stream's profiled CPU, growing with the history) and the streaming-response
        wrapper: about 0.23 ms less per request (in-process, mock transport).

        `params` (the /v1 pass-through fields, whatever their names) and `fields`
        (the token caps, temperature) are sent as given; ``model``, ``messages``,
        ``stream`` and ``stream_options.include_usage`` are always ours.
        `relay_deltas`: keep the non-content deltas (see `UpstreamStream.extras`).
        `head_timeout`: no response head within this long is an ``upstream_timeout``
        (one gevent timer around the call, none on the body's reads).
        """
        body = {
            **(params or {}),
            **fields,
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {**(stream_options or {}), "include_usage": True},
        }
        timer = gevent.Timeout(head_timeout) if head_timeout else None
        try:
            if timer is not None:
                timer.start()
            response = self.client.post(
                "/chat/completions",
                cast_to=httpx2.Response,
                body=body,
                # identity: the raw bytes are the text (no decoder layer per chunk)
                options=_OPTIONS,
                stream=True,
            )
        except openai.APIStatusError as exc:
            raise _status_error(exc) from None
        except openai.APITimeoutError:
            raise UpstreamError("upstream_timeout", "The model provider did not answer.") from None
        except openai.APIConnectionError:
            raise UpstreamError("upstream_error", "The model provider is unreachable.") from None
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            exc.__traceback__ = None  # the timer (a local here) must not hold this frame
            raise UpstreamError("upstream_timeout", "The model provider did not answer.") from None
        finally:
            if timer is not None:
                timer.close()
        return UpstreamStream(None, response, relay_deltas)

    def close(self) -> None:
        self.client.close()


class UpstreamStream:
    """An open streaming response. `close()` closes the HTTP connection.

    `manager`, when given, is a context manager that owns the response (its ``__exit__``
    closes it); otherwise `close()` closes the response itself.
    """

    def __init__(self, manager: Any, response: httpx2.Response, relay_deltas: bool = False):
        self._manager = manager
        self._response = response
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.saw_done = False
        self.deltas = 0  # deltas received that carried something (text or more)
        # With relay_deltas: the last read's text (str) and other deltas (dict), in order,
        # when it had any other delta (then iter_text yields "" for it); see `take_extras`.
        self.extras: list[str | dict[str, Any]] | None = [] if relay_deltas else None
        self._failed: str | None = None  # why the stream is unusable (a bad or error chunk)
        network = response.extensions.get("network_stream")
        self._network = network if isinstance(network, PacedStream) else None
        # A chunked, unencoded body is read past h11 (see streaming.upstream.net).
        self._body: ChunkedBody | None = None
        headers = response.headers
        head = self._network.head if self._network is not None else None
        if (
            net.READ_BODY_PAST_H11
            and head is not None
            and head[9:12] == b"%d" % response.status_code  # this response's head (not a 1xx)
            and response.http_version == "HTTP/1.1"
            and headers.get("transfer-encoding", "").lower() == "chunked"
            and headers.get("content-encoding", "identity").lower() == "identity"
        ):
            self._body = ChunkedBody(self._network)

    def pace(self, before_wait: Callable[[], None] | None) -> None:
        """Call `before_wait` before each network read that would wait (None: stop).

        The connection returns to the pool after the stream, so `close()` clears it.
        """
        if self._network is not None:
            self._network.pace = before_wait

    def iter_text(self) -> Iterator[str]:
        """The text of each network read (possibly ""), as it arrives."""
        tail = b""
        # Otherwise the transport's byte stream, not iter_raw(): two generator
        # layers less per chunk (httpx2 still maps transport errors to its own).
        body = self._body if self._body is not None else self._response.stream
        try:
            # A final newline ends a last line that has none.
            for raw in itertools.chain(body, (b"\n",)):
                lines = (tail + raw).split(b"\n") if tail else raw.split(b"\n")
                tail = lines.pop()
                yield self._parse(lines)
                if self._failed:
                    raise UpstreamError("upstream_error", self._failed)
        except (httpx2.TimeoutException, httpcore2.TimeoutException):
            raise UpstreamError("upstream_timeout", "The model provider went silent.") from None
        except (
            httpx2.TransportError,
            httpx2.StreamError,
            httpcore2.NetworkError,
            httpcore2.ProtocolError,
        ):
            raise UpstreamError(
                "upstream_error", "The model provider dropped the stream."
            ) from None
        if self._body is not None and self._body.release():
            self._drain()
        if self.finish_reason is None and not self.saw_done:
            raise UpstreamError("upstream_error", "The model provider's stream was cut off.")

    def _drain(self) -> None:
        """Let httpcore finish the message it parsed the head of, so the connection is pooled."""
        try:
            for _ in self._response.stream:
                pass
        except Exception:  # its parser disagreed: the connection is closed, not reused
            logger.debug("upstream connection not reusable", exc_info=True)

    def _parse(self, lines: list[bytes]) -> str:
        """The text of these lines. A bad or error chunk stops here (see `_failed`).

        The text before it is still returned: one network read can hold it and the bad chunk.
        The chunks of one read are JSON-decoded in one call (a few µs less per chunk); if
        that fails, one by one, to find the bad one.
        """
        payloads = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event: lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.saw_done = True
            else:
                payloads.append(payload)
        if not payloads:
            return ""
        try:
            chunks = json.loads(b"[%b]" % b",".join(payloads))
            if len(chunks) != len(payloads):  # a line held more than one value
                raise ValueError
        except ValueError:
            chunks = self._one_by_one(payloads)
        pieces: list[str] = []
        try:
            for chunk in chunks:
                if "error" in chunk:
                    self._failed = "The model provider reported an error."
                    break
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or _NO_DELTA
                    text = delta.get("content")
                    if text is not None and len(delta) == 1 and choice.get("logprobs") is None:
                        if text:  # the fast path: a chunk that carries only content
                            pieces.append(text)
                            self.deltas += 1
                    elif delta or choice.get("logprobs") is not None:
                        self._mixed(choice, delta, pieces)
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
        except (TypeError, AttributeError, KeyError):
            self._failed = "The model provider sent a bad chunk."
        if self.extras:  # this read had other deltas: its text goes with them, in order
            if pieces:
                self.extras.append("".join(pieces))
            return ""
        return "".join(pieces)

    def _mixed(self, choice: dict[str, Any], delta: dict[str, Any], pieces: list[str]) -> None:
        """A delta that is not content alone: its text to `pieces`, the rest to `extras`."""
        text = delta.get("content")
        if text is not None and not isinstance(text, str):
            raise TypeError
        if text:
            pieces.append(text)
        extras = self.extras
        rest = None
        if extras is not None:
            rest = {k: v for k, v in delta.items() if v is not None and k not in _NOT_RELAYED}
            logprobs = choice.get("logprobs")
            if logprobs is not None:
                rest["logprobs"] = logprobs
            if rest:
                if pieces:
                    extras.append("".join(pieces))
                    pieces.clear()
                extras.append(rest)
        if text or rest:
            self.deltas += 1

    def take_extras(self) -> list[str | dict[str, Any]]:
        """The last read's text and other deltas, in order (and forget them)."""
        extras = self.extras or []
        self.extras = []
        return extras

    def _one_by_one(self, payloads: list[bytes]) -> list[Any]:
        """The chunks before the first one that is not JSON (and mark the stream failed)."""
        chunks = []
        for payload in payloads:
            try:
                chunks.append(json.loads(payload))
            except ValueError:
                self._failed = "The model provider sent a bad chunk."
                break
        return chunks

    def close(self) -> None:
        self.pace(None)
        if self._manager is not None:
            self._manager.__exit__(None, None, None)
        else:
            self._response.close()
