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
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

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
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def _status_error(exc: openai.APIStatusError) -> UpstreamError:
    if exc.status_code == 429:
        return UpstreamError("upstream_rate_limited", "The model provider is rate limiting.")
    return UpstreamError("upstream_error", f"The model provider answered HTTP {exc.status_code}.")


_OPTIONS: Any = {"headers": {"Accept-Encoding": "identity"}}


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

    def open(self, model: str, messages: list[dict[str, str]], **params: Any) -> UpstreamStream:
        """Send the request; returns once the response head arrived.

        Through ``client.post`` with ``cast_to=httpx.Response``: the SDK still builds,
        authenticates and sends the request, maps HTTP errors to its exceptions and
        hands back the unread response; it skips ``create()``'s TypedDict transform of
        the parameters (an identity for validated text messages, 31 % of a short
        stream's profiled CPU, growing with the history) and the streaming-response
        wrapper: about 0.23 ms less per request (in-process, mock transport).
        """
        body = {
            "model": model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **params,
        }
        try:
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
        return UpstreamStream(None, response)

    def close(self) -> None:
        self.client.close()


class UpstreamStream:
    """An open streaming response. `close()` closes the HTTP connection.

    `manager`, when given, is a context manager that owns the response (its ``__exit__``
    closes it); otherwise `close()` closes the response itself.
    """

    def __init__(self, manager: Any, response: httpx2.Response):
        self._manager = manager
        self._response = response
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.saw_done = False
        self.deltas = 0  # content deltas received
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
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        pieces.append(text)
                        self.deltas += 1
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
        except (TypeError, AttributeError, KeyError):
            self._failed = "The model provider sent a bad chunk."
        return "".join(pieces)

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
