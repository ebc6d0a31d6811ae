"""One generation: upstream deltas -> SSE events -> followers, ending in one `finally`.

Flow (normal end). ``StreamManager.start`` registers the stream in Redis and
builds a `Generation`; its ``start`` event (seq 1) exists before the upstream
is called, so the client gets ``200`` and ``start`` at once. ``run`` (its own
greenlet, independent of any client connection) opens the upstream and reads
it network chunk by network chunk. Text is coalesced: deltas that arrive
without the reader blocking are joined into one ``token`` event, emitted by a
hub callback the moment the reader blocks or yields; once the first token is
out, a network read that would wait is preceded by a pause of
``RELAY_INTERVAL_MS``, so a paced upstream is relayed in batches, one wake-up
per batch (see `_relay`). The reader yields at least every `YIELD_EVERY`
chunks, so a fast upstream cannot starve the other streams of its worker.
Events go to the in-process frame list (live followers on this worker are
woken directly) and, batched every 100 ms by the manager's flusher, to the
Redis event log for followers elsewhere.

Flow (any other end). Cancel, client gone past the grace window, upstream
silence (the manager's watchdog) and worker shutdown all arrive as a
`StreamStopped` thrown into the reader greenlet
(only while it relays, never into its cleanup); upstream failures arrive as
`UpstreamError`. All of them, and the normal end, leave through the single
``finally`` of ``run``: close the upstream response (this is what stops the
billing), emit ``error`` if any, emit the one ``done``, then let the manager
flush the log, mark the registry entry finished and acknowledge a cancel.

Deltas other than text (``/v1`` generations only: `GenerationRequest.relay_deltas`).
Text always travels as ``token`` events, on the fast path above. Whatever
else a delta carries (``tool_calls`` fragments, ``refusal``, ``logprobs``,
fields a provider adds) is relayed raw, as ``delta`` events:
``{"type": "delta", "deltas": [<delta>, ...], "index": n}``, one per run of
such deltas in one network read, each delta as the upstream sent it less
``content`` and ``role`` (``logprobs``, a field of the choice, is moved into
it). A ``delta`` event is emitted at once, after the text read before it, so
the order of the upstream's deltas is kept. They are frames like any other:
in the event log, replayed and followed; the native API's followers skip
them (`streaming.core.follow`), so ``/api/v1`` stays text-only. The upstream's
``finish_reason`` becomes ``done.reason`` when it is neither ``stop`` nor
``length`` (``tool_calls``, ``content_filter``; any other identifier too).

Memory. A finished generation must be freed by reference counting alone, the
moment its last follower lets go: one caught in a reference cycle lives until
Python's rare full collection, with all its text. So no exception that was
raised is ever kept on the generation (its traceback holds the ``run`` frame,
which holds the generation): a stop is kept as plain data and a fresh
`StreamStopped` is thrown; nothing the generation owns keeps a closure over
it once it ended (the grace greenlet is dropped, the upstream's pacing hook is
cleared by ``close``). tests/test_memory_release.py checks every path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
from gevent import get_hub

from streaming import metrics
from streaming.core.messages import text_length
from streaming.sse import encode_json
from streaming.upstream.client import UpstreamError, UpstreamStream

if TYPE_CHECKING:
    from streaming.core.manager import StreamManager
    from streaming.upstream.routing import Route

__all__ = ["Generation", "GenerationRequest", "StreamStopped", "done_reason"]

logger = logging.getLogger(__name__)

YIELD_EVERY = 16  # network chunks a reader may take in a row before yielding to others


class StreamStopped(BaseException):
    """Thrown into a relaying generation to end it (like GreenletExit, not an Exception)."""

    def __init__(self, reason: str, error: tuple[str, str] | None = None):
        super().__init__(reason)
        self.reason, self.error = reason, error


@dataclass(frozen=True)
class GenerationRequest:
    """Everything a generation needs, copied out of the HTTP request."""

    stream_id: str
    owner: str
    model: str
    messages: list[dict[str, Any]]
    # The token caps, as the client gave them (budgets lower them; see streaming.core.usage).
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    session_id: str | None = None
    client: str = ""
    new_messages: list[dict[str, Any]] = field(default_factory=list)  # saved to the session
    # /v1: the fields forwarded as given (not model, messages, stream, the caps, temperature)
    params: dict[str, Any] = field(default_factory=dict)
    stream_options: dict[str, Any] | None = None  # the client's; include_usage is always ours
    relay_deltas: bool = False  # emit `delta` events (/v1); the native API is text-only
    surface: str = "api"  # "api" (/api/v1) or "v1" (OpenAI's); metrics count usage by it

    def upstream_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.model, "messages": self.messages}
        if self.params:
            params["params"] = self.params
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.max_completion_tokens is not None:
            params["max_completion_tokens"] = self.max_completion_tokens
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.stream_options:
            params["stream_options"] = self.stream_options
        if self.relay_deltas:
            params["relay_deltas"] = True
        return params


class Generation:
    """A live stream on this worker: its frames, its followers, its reader greenlet."""

    base = 0  # frames[i] is the event of seq i + 1 (followers also follow `RemoteStream`s)

    def __init__(self, manager: StreamManager, request: GenerationRequest):
        self.manager = manager
        self.request = request
        self.stream_id = request.stream_id
        self.created = time.time()
        self._t0 = time.perf_counter()
        self.frames: list[bytes] = []
        self.flushed = 0  # frames already in the Redis event log
        self.done = False
        self.reason: str | None = None
        self.ended = gevent.event.Event()
        self.waiters: set[gevent.event.Event] = set()
        self.attached = 0
        self.text: list[str] = []  # the reply so far (sessions save it)
        self.token_events = 0
        self.delta_events = 0
        self.delta_chars = 0  # text in the delta events (tool call arguments, refusal)
        self.ttft_ms: float | None = None
        self._pending: list[str] = []
        self._relaying = False
        self._stop: tuple[str, tuple[str, str] | None] | None = None  # (reason, error)
        self._grace: gevent.Greenlet | None = None
        self._upstream_open = False
        self.head_ms: float | None = None  # generation created -> upstream response head
        self.route: Route | None = None  # the upstreams tried (streaming.upstream.routing)
        self.last_read = time.monotonic()  # the watchdog's clock (see StreamManager)
        self.greenlet: gevent.Greenlet | None = None
        self.emit(
            "start",
            {
                "type": "start",
                "stream_id": self.stream_id,
                "session_id": request.session_id,
                "model": request.model,
                "created": int(self.created),
            },
        )

    # -- events -------------------------------------------------------------------

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        self.frames.append(encode_json(payload, event=event, id=len(self.frames) + 1))
        self.manager.log.mark_dirty(self)
        for waiter in self.waiters:
            waiter.set()

    def _add_text(self, text: str) -> None:
        if not self._pending:
            get_hub().loop.run_callback(self._emit_pending)
        self._pending.append(text)

    def _emit_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        if self.ttft_ms is None:
            self._first_out()
        self.text.append(text)
        self.emit("token", {"type": "token", "token": text, "index": self.token_events})
        self.token_events += 1

    def _first_out(self) -> None:
        self.ttft_ms = (time.perf_counter() - self._t0) * 1000
        metrics.TTFT.labels(self._upstream()).observe(self.ttft_ms / 1000)

    def _upstream(self) -> str:
        return self.route.upstream if self.route is not None else "none"

    def _add_extras(self, items: list[str | dict[str, Any]]) -> None:
        """One read's text and other deltas, in order (see Deltas above)."""
        deltas: list[dict[str, Any]] = []
        for item in items:
            if isinstance(item, str):
                if deltas:
                    self._emit_deltas(deltas)
                    deltas = []
                self._add_text(item)
            else:
                deltas.append(item)
        if deltas:
            self._emit_deltas(deltas)

    def _emit_deltas(self, deltas: list[dict[str, Any]]) -> None:
        self._emit_pending()  # the text before them leaves first
        if self.ttft_ms is None:
            self._first_out()
        self.delta_chars += sum(_text_chars(d) for d in deltas)
        self.emit("delta", {"type": "delta", "deltas": deltas, "index": self.delta_events})
        self.delta_events += 1

    # -- followers and the grace window ---------------------------------------------

    def attach(self) -> None:
        self.attached += 1
        if self._grace is not None:
            self._grace.kill(block=False)
            self._grace = None

    def detach(self) -> None:
        self.attached -= 1
        if self.attached <= 0 and not self.done:
            self.start_grace()

    def start_grace(self) -> None:
        if self._grace is None and not self.done:
            self._grace = gevent.spawn(self._grace_window)

    def _grace_window(self) -> None:
        while True:
            gevent.sleep(self.manager.settings.disconnect_grace_seconds)
            if self.attached > 0 or self.done:
                return
            if not self.manager.log.watched_elsewhere(self.stream_id):
                break
        self._grace = None
        logger.info("stream %s: no client for the grace window, cancelling", self.stream_id)
        self.stop(StreamStopped("cancelled"))

    # -- stopping -------------------------------------------------------------------

    def stop(self, stop: StreamStopped) -> None:
        """Ask the reader to end (cancel, client gone, shutdown); safe to call any time.

        Only the reason and error are kept (plain data): an exception kept here
        would, once raised, hold the reader's frames, and so this generation,
        in a reference cycle (see Memory above).
        """
        if self.done or self._stop is not None:
            return
        self._stop = (stop.reason, stop.error)
        if self._relaying:
            get_hub().loop.run_callback(self._throw)

    def _throw(self) -> None:
        # Runs in the hub: throw only while the reader relays, never into its cleanup.
        greenlet = self.greenlet
        if self._relaying and self._stop is not None and greenlet is not None and not greenlet.dead:
            greenlet.throw(StreamStopped(*self._stop))

    # -- the reader -----------------------------------------------------------------

    def run(self) -> None:
        stream: UpstreamStream | None = None
        reason, error = "error", None
        self._relaying = True
        metrics.LIVE_STREAMS.inc()
        try:
            if self._stop is not None:
                raise StreamStopped(*self._stop)
            params = self.request.upstream_params()
            route = self.route = self.manager.router.route(params.pop("model"))
            while True:  # failover (API.md section 11): until the first delta is relayed
                target = route.next()
                if target is None:
                    raise route.unavailable()
                self.last_read = time.monotonic()  # each attempt gets the watchdog's full time
                self._upstream_open = False
                try:
                    stream = target.open(self.request.model, **params)
                    self.head_ms = (time.perf_counter() - self._t0) * 1000
                    self._upstream_open = True
                    self._relay(stream)
                    break
                except UpstreamError as exc:
                    exc.__traceback__ = None
                    if not route.failed(exc, relayed=self._relayed()):
                        raise
                    if stream is not None:  # the failed response is closed before moving on
                        self._close_upstream(stream)
                        stream = None
            reason = done_reason(stream.finish_reason)
        except StreamStopped as stop:
            reason, error = stop.reason, stop.error
            stop.__traceback__ = None  # the raised exception must not hold our frames
        except UpstreamError as exc:
            error = (exc.code, exc.message)
            exc.__traceback__ = None
        except Exception:
            # Policy: a bug must still end the stream properly; the trace goes to the log.
            logger.exception("generation %s failed", self.stream_id)
            error = ("internal_error", "The generation failed.")
        finally:
            self._relaying = False
            if stream is not None:
                self._close_upstream(stream)
            if self.route is not None:
                self.route.end(reason, error[0] if error else None)
            self._finish(reason, error, stream)

    def _relayed(self) -> bool:
        """Has anything of the answer reached the frames (or is about to)?"""
        return bool(self._pending or self.token_events or self.delta_events)

    def _relay(self, stream: UpstreamStream) -> None:
        """Read the upstream network chunk by network chunk into token events.

        Deltas read without waiting leave together as one event when the reader
        next waits or yields. Once the first token is out (time to first token
        is what users feel, so it is never held), a network read that would
        wait is preceded by a pause of ``RELAY_INTERVAL_MS``: the text read so
        far leaves as the pause begins, and what the upstream sends meanwhile
        is taken after it in one go. So a paced upstream costs one wake-up and
        one client write per interval, not per token; a slow one (less than a
        token per interval) is relayed as each token comes; no text waits
        longer than the interval. A fast upstream never waits, so it is never
        paused, but yields every `YIELD_EVERY` chunks so that it cannot starve
        the other streams of its worker.
        """
        interval = self.manager.settings.relay_interval_ms / 1000
        if interval:

            def pause() -> None:  # before a read that would wait
                if self.token_events or self.delta_events:
                    gevent.sleep(interval)

            stream.pace(pause)
        served = False
        for count, text in enumerate(stream.iter_text(), 1):
            if text:
                self._add_text(text)
            elif stream.extras:  # a read with other deltas (/v1 only): text and deltas in order
                self._add_extras(stream.take_extras())
            if not served and self._relayed():
                served = True
                self.route.served()  # the breaker's verdict: this upstream works
            if count % YIELD_EVERY == 0:
                gevent.sleep(0)
            self.last_read = time.monotonic()

    def upstream_silent(self) -> None:
        """The watchdog saw no upstream byte for UPSTREAM_TIMEOUT_SECONDS."""
        message = (
            "The model provider went silent."
            if self._upstream_open
            else "The model provider did not answer."
        )
        self.stop(StreamStopped("error", ("upstream_timeout", message)))

    def _close_upstream(self, stream: UpstreamStream) -> None:
        try:
            stream.close()
        except Exception:  # closing a broken connection may raise; it is closed all the same
            logger.debug("upstream close of %s raised", self.stream_id, exc_info=True)

    def _finish(self, reason: str, error: tuple[str, str] | None, stream: UpstreamStream | None):
        self._emit_pending()
        if error is not None:
            self.emit("error", {"type": "error", "error": {"code": error[0], "message": error[1]}})
        elapsed_ms = (time.perf_counter() - self._t0) * 1000
        usage = stream.usage if stream is not None else None
        self.done = True
        self.reason = reason
        self.emit(
            "done",
            {
                "type": "done",
                "finished": True,
                "reason": reason,
                "usage": self._usage(usage),
                "metadata": {
                    "token_count": stream.deltas if stream is not None else 0,
                    "ttft_ms": round(self.ttft_ms, 1) if self.ttft_ms is not None else None,
                    "elapsed_ms": round(elapsed_ms, 1),
                    # section 11: who served, and who was tried and failed before it
                    "upstream": self.route.upstream if stream is not None else None,
                    "failed_over": list(self.route.failed_over) if self.route else [],
                },
            },
        )
        grace, self._grace = self._grace, None
        if grace is not None:
            grace.kill(block=False)
        self._count(reason, error, stream)
        self.manager.finished(self, error[0] if error else None)
        self.ended.set()

    def _count(self, reason: str, error: tuple[str, str] | None, stream: UpstreamStream | None):
        upstream = self._upstream()
        metrics.LIVE_STREAMS.dec()
        metrics.GENERATIONS.labels(reason, upstream).inc()
        if stream is not None:
            metrics.TOKENS.labels(upstream).inc(stream.deltas)
        stopped = self._stop[1] if self._stop is not None else None
        if error is not None and stopped is not None and error[0] == "upstream_timeout":
            # the watchdog's (upstream silence); each failed attempt is counted by the route
            metrics.UPSTREAM_ERRORS.labels(error[0], upstream).inc()
        logger.info(
            "generation_finished",
            extra={
                "stream_id": self.stream_id,
                "reason": reason,
                "error": error[0] if error else None,
                "tokens": stream.deltas if stream is not None else 0,
                "ttft_ms": round(self.ttft_ms, 1) if self.ttft_ms is not None else None,
                "upstream_head_ms": round(self.head_ms, 1) if self.head_ms is not None else None,
                "upstream": upstream,
                "failed_over": self.route.failed_over if self.route is not None else [],
                "elapsed_ms": round((time.perf_counter() - self._t0) * 1000, 1),
                "client": self.request.client,
                "worker": self.manager.worker_id,
            },
        )

    def _usage(self, usage: dict[str, int] | None) -> dict[str, Any]:
        if usage and "prompt_tokens" in usage and "completion_tokens" in usage:
            return {
                "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"],
                "estimated": False,
            }
        prompt_chars = text_length(self.request.messages)
        completion_chars = sum(len(t) for t in self.text) + self.delta_chars
        return {
            "prompt_tokens": max(1, prompt_chars // 4),
            "completion_tokens": (completion_chars + 3) // 4,
            "estimated": True,
        }


_OURS = frozenset({"cancelled", "error"})  # reasons that are Sluice's, never an upstream's


def done_reason(finish_reason: Any) -> str:
    """``done.reason`` for an upstream's end: its own when neither stop nor length."""
    if finish_reason == "length":
        return "length"
    if (
        isinstance(finish_reason, str)
        and finish_reason not in _OURS
        and len(finish_reason) <= 40
        and finish_reason.isascii()
        and finish_reason.isidentifier()  # a bounded label (metrics count by reason)
    ):
        return finish_reason
    return "stop"


def _text_chars(value: Any) -> int:
    """Characters of the strings in a delta, ``logprobs`` aside (the usage estimate)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(_text_chars(v) for k, v in value.items() if k not in ("logprobs", "type", "id"))
    if isinstance(value, list):
        return sum(_text_chars(v) for v in value)
    return 0
