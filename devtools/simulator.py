"""Sluice upstream simulator: a fast, deterministic, observable OpenAI-compatible server.

``python -m devtools.simulator [--host 127.0.0.1] [--port 0] [--tokens 64] [--rate 40]
[--delay 0.3] [--name NAME]`` prints ``simulator listening on http://HOST:PORT`` once it
accepts connections and exits 0 on SIGTERM/SIGINT (rate: tokens/s, 0 = unthrottled; delay:
seconds before the first content token).  In-process: ``serve(...)``, or
``Simulator(...).start()`` under gevent.

Routes: POST /v1/chat/completions, GET /v1/models, GET /_sim/stats and
GET /_sim/requests/<tag>?wait=seen|ended&timeout=<s> (the request's record; states: open,
completed, client_closed, aborted = closed on purpose, failed = answered an HTTP error).

Directives: whitespace-separated ``sim:key=value`` words in the last message's content.
``sim:NAME.key=value`` applies only on the simulator started with ``--name NAME`` (several
simulators as several upstreams: ``sim:primary.fail=503`` fails on the primary alone).
    tag=NAME          name for /_sim/requests/NAME (default: the completion id; keep unique)
    tokens=N rate=R delay=S   override the command-line defaults
    fail=STATUS       answer an OpenAI-style error; retry_after=S adds a Retry-After header
    close_after=N     after N content chunks close the socket abruptly (no terminating chunk)
    truncate_after=N  after N content chunks end the body cleanly, no finish_reason nor [DONE]
    stall_after=N     after N content chunks send nothing for stall=S seconds, then go on
    malformed_after=N after N content chunks send ``data: {not json`` and then go on normally
    hang=S            wait S seconds before sending the response head at all
    refuse=1          answer with a refusal (``refusal`` deltas, no content)
    finish=NAME       end with this finish_reason (e.g. content_filter) instead of stop
Non-streaming answers come after delay + tokens/rate (+ stall) seconds; close_after or
truncate_after then close the connection unanswered.  Every wait notices the client closing.

Like a tool-calling model (deterministic; ``tokens=`` counts only plain answers):
- ``tools`` (and ``tool_choice`` not "none"), last message not a tool result: one tool call
  to the first tool (or the one ``tool_choice`` names), streamed name first (with its id and
  ``arguments: ""``), then the JSON arguments in fragments, then ``finish_reason:
  "tool_calls"``.  Arguments follow the tool's JSON schema: a string property gets the last
  words of the last user message ("weather in Paris" -> "Paris"), numbers 1, booleans true,
  an ``enum`` its first value.  Non-streaming: the message's ``tool_calls``, content null.
- a ``tool`` message last: an answer that quotes it ("The tool returned: <its content>").
- ``response_format`` json_object / json_schema: the answer is JSON text (an object following
  the schema, its strings taken from the last user message as for tool arguments, or
  ``{"answer": <the text>}``), in fragments.
- ``stop``: the text ends before the first stop sequence (finish_reason stop).
- ``logprobs``: each content chunk carries ``logprobs.content`` (``top_logprobs`` alternatives).
- max_tokens / max_completion_tokens cut any answer (finish_reason length).
/_sim/requests/<tag> also shows the request body as received (``request``, up to 64 KB).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from http.client import responses
from socket import IPPROTO_TCP, MSG_PEEK, SHUT_WR, TCP_NODELAY
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import gevent
from gevent.event import Event
from gevent.server import StreamServer

__all__ = ["Defaults", "Record", "Simulator", "main", "parse_directives", "serve", "tokens_for"]

MAX_HEAD, MAX_BODY, MAX_RECORDS = 64 * 1024, 4 * 1024 * 1024, 10_000
MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "sim-fast")
_WORDS = tuple(
    w + " "
    for w in "the of and to in is it you that he was for on are with as his they be at one have "
    "this from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them".split()
)
_NON_ASCII = ("café ", "naïve ", "jalapeño ", "über ", "façade ", "smörgåsbord ", "crème ")
_INT_KEYS = {"tokens", "fail", "close_after", "truncate_after", "stall_after", "malformed_after"}
_INT_KEYS |= {"refuse"}
_KEYS = _INT_KEYS | {"rate", "delay", "stall", "hang", "retry_after"}
_ACTIONS = ("malformed_after", "stall_after", "truncate_after", "close_after")
_ERRORS = {401: ("invalid_request_error", "invalid_api_key"), 403: ("permission_error", None)}
_ERRORS |= {404: ("invalid_request_error", "not_found"), 429: ("requests", "rate_limit_exceeded")}
_FIELDS = ("tag", "state", "chunks_sent", "tokens_sent", "started", "ended", "model")
_FIELDS += ("max_tokens", "messages_count", "request")
_REFUSAL = "I'm sorry, but I can't help with that request."
_STRING_KEYS = ("tag", "finish")
_MODEL = {"object": "model", "created": 1700000000, "owned_by": "sluice-simulator"}
_MODEL_LIST = json.dumps({"object": "list", "data": [{"id": m, **_MODEL} for m in MODELS]}).encode()


class _ClientClosed(Exception):
    """The client closed its connection while the simulator was waiting."""


class _Reject(Exception):
    """An HTTP-level problem with the request: answer (status, message) and close."""


@dataclass(frozen=True)
class Defaults:
    """Defaults for requests without the matching directive."""

    tokens: int = 64
    rate: float = 40.0
    delay: float = 0.3


class Record:
    """Observable state of one chat completion request (``chunks_sent`` counts SSE events)."""

    __slots__ = (*_FIELDS, "done")

    def __init__(
        self,
        tag: str,
        model: str,
        max_tokens: int | None,
        messages_count: int,
        request: dict[str, Any] | None = None,
    ) -> None:
        self.tag, self.model, self.max_tokens = tag, model, max_tokens
        self.messages_count, self.request = messages_count, request
        self.state, self.chunks_sent, self.tokens_sent = "open", 0, 0
        self.started, self.ended, self.done = time.time(), None, Event()

    def finish(self, state: str) -> None:
        if self.state == "open":
            self.state, self.ended = state, time.time()
            self.done.set()

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}


def tokens_for(prompt: str, n: int) -> list[str]:
    """Deterministic content tokens for *prompt*: every 16th is "\\n", 1 in 32 is non-ASCII."""
    seed = zlib.crc32(prompt.encode("utf-8", "surrogatepass"))
    toks = [_WORDS[(seed + i) % len(_WORDS)] for i in range(n)]
    toks[15::16] = ["\n"] * len(toks[15::16])
    toks[7::32] = [_NON_ASCII[(seed + k) % len(_NON_ASCII)] for k in range(len(toks[7::32]))]
    return toks


def parse_directives(text: str, name: str = "") -> tuple[dict[str, Any], str]:
    """Split ``sim:key=value`` words out of *text*; ValueError on a bad directive.

    ``sim:NAME.key=value`` applies only on the simulator started with ``--name NAME``
    (elsewhere it is dropped all the same, so every simulator sees the same text).
    """
    opts: dict[str, Any] = {}
    words = []
    for word in text.split():
        key, _, value = word[4:].partition("=")
        scope, dot, scoped = key.partition(".")
        if word.startswith("sim:") and dot:
            if scope != name:
                parse_directives(f"sim:{scoped}={value}")  # still checked
                continue
            key = scoped
        if not word.startswith("sim:"):
            words.append(word)
        elif key in _STRING_KEYS and value:
            if key == "finish" and not value.isidentifier():
                raise ValueError(f"bad simulator directive {word!r}")
            opts[key] = value
        else:
            try:
                number = int(value) if key in _INT_KEYS else float(value)
                low, high = (400, 599) if key == "fail" else (0, 1e9)
                if key not in _KEYS or not low <= number <= high:
                    raise ValueError
            except ValueError:
                raise ValueError(f"bad simulator directive {word!r}") from None
            opts[key] = number
    return opts, " ".join(words)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


# -- the answer a tool-calling model would give ----------------------------------------
# An answer is a list of items: a str is a content token (the fast, pre-encoded path), a
# dict is one choice's other fields (``delta``, maybe ``logprobs``) for one chunk.


def _words(text: str) -> list[str]:
    return [w.strip(".,;:!?\"'()[]{}") for w in text.split() if w.strip(".,;:!?\"'()[]{}")]


def _value(name: str, schema: Any, words: list[str], i: int) -> Any:
    schema = schema if isinstance(schema, dict) else {}
    kind = schema.get("type")
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if kind == "integer" or kind == "number":
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object":
        return _object(schema, words)
    return words[-1 - i % len(words)] if words else name


def _object(schema: Any, words: list[str]) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return {}
    return {name: _value(name, sub, words, i) for i, (name, sub) in enumerate(props.items())}


def _pieces(text: str, size: int = 6) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _tool(req: dict[str, Any]) -> dict[str, Any] | None:
    """The function the model calls, or None (no tools, tool_choice none, a tool result last)."""
    tools = [t for t in req.get("tools") or () if isinstance(t, dict)]
    choice = req.get("tool_choice")
    last = req["messages"][-1]
    if not tools or choice == "none" or isinstance(last, dict) and last.get("role") == "tool":
        return None
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        for tool in tools:
            if (tool.get("function") or {}).get("name") == wanted:
                return tool.get("function")
    return tools[0].get("function") or {}


def _tool_call(function: dict[str, Any], user_words: list[str], prompt: str) -> list[Any]:
    name = str(function.get("name") or "tool")
    arguments = json.dumps(_object(function.get("parameters"), user_words))
    call_id = f"call_{zlib.crc32((prompt + name).encode('utf-8', 'surrogatepass')):08x}"
    head = {"index": 0, "id": call_id, "type": "function"}
    head["function"] = {"name": name, "arguments": ""}
    items: list[Any] = [{"delta": {"tool_calls": [head]}}]
    for piece in _pieces(arguments):
        items.append({"delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}})
    return items


def _json_answer(response_format: dict[str, Any], tokens: list[str], words: list[str]) -> list[str]:
    schema = (response_format.get("json_schema") or {}).get("schema")
    if response_format.get("type") == "json_schema" and isinstance(schema, dict):
        obj = _object(schema, words)
    else:
        obj = {"answer": "".join(tokens).strip()}
    return _pieces(json.dumps(obj, ensure_ascii=False))


def _stopped(tokens: list[str], stop: Any) -> tuple[list[str], bool]:
    """The tokens up to the first stop sequence (cut inside a token if need be)."""
    stops = [stop] if isinstance(stop, str) else [s for s in stop or () if isinstance(s, str)]
    text = "".join(tokens)
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not cuts:
        return tokens, False
    end, out, at = min(cuts), [], 0
    for tok in tokens:
        if at + len(tok) > end:
            if end > at:
                out.append(tok[: end - at])
            break
        out.append(tok)
        at += len(tok)
    return out, True


def _logprob(tok: str, k: int) -> dict[str, Any]:
    seed = zlib.crc32(tok.encode("utf-8", "surrogatepass"))
    lp = -round((seed % 1000) / 997, 4)

    def entry(t: str, p: float) -> dict[str, Any]:
        return {"token": t, "logprob": p, "bytes": list(t.encode())}

    top = [entry(tok, lp)] + [
        entry(_WORDS[(seed + j) % len(_WORDS)], round(lp - j - 0.5, 4)) for j in range(1, k)
    ]
    return {"content": [{**entry(tok, lp), "top_logprobs": top[:k]}], "refusal": None}


def answer_items(
    req: dict[str, Any], texts: list[str], opts: dict[str, Any], wanted: int
) -> tuple[list[Any], str]:
    """The items of the answer to `req` (before max_tokens) and its finish_reason."""
    prompt = "\n".join(texts)
    messages = req["messages"]
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    users = [t for role, t in zip(roles, texts, strict=True) if role == "user"]
    words = _words(users[-1] if users else "")
    function = _tool(req)
    if function is not None:
        return _tool_call(function, words, prompt), "tool_calls"
    finish = opts.get("finish", "stop")
    if opts.get("refuse"):
        return [{"delta": {"refusal": w}} for w in _pieces(_REFUSAL, 8)], finish
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "tool":
        tokens = [w + " " for w in f"The tool returned: {texts[-1]}".split()]
    else:
        tokens = tokens_for(prompt, wanted)
    response_format = req.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") != "text":
        tokens = _json_answer(response_format, tokens, words)
    tokens, _ = _stopped(tokens, req.get("stop"))
    if req.get("logprobs") is True:
        k = req.get("top_logprobs") if type(req.get("top_logprobs")) is int else 0
        return [{"delta": {"content": t}, "logprobs": _logprob(t, k)} for t in tokens], finish
    return tokens, finish


def _message(items: list[Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The whole message (and the choice's logprobs) that `items` stream."""
    content, refusal, logprobs = [], [], []
    calls: dict[str, Any] = {}
    for item in items:
        if isinstance(item, str):
            content.append(item)
            continue
        delta = item["delta"]
        content.append(delta.get("content") or "")
        refusal.append(delta.get("refusal") or "")
        for call in delta.get("tool_calls") or ():
            if not calls:
                calls = {k: v for k, v in call.items() if k != "index"}
                calls["function"] = dict(call["function"])
            else:
                calls["function"]["arguments"] += call["function"].get("arguments", "")
        if item.get("logprobs"):
            logprobs += item["logprobs"]["content"]
    text, refused = "".join(content), "".join(refusal) or None
    message = {"role": "assistant", "content": text if text or not (calls or refused) else None}
    message["refusal"] = refused
    if calls:
        message["tool_calls"] = [calls]
    return message, ({"content": logprobs, "refusal": None} if logprobs else None)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _watch_eof(sock: Any, target: Any) -> None:
    """Runs beside a response (which waits with cheap plain sleeps): interrupt *target* with
    _ClientClosed as soon as the peer closes the connection, without writing anything."""
    try:
        if sock.recv(1, MSG_PEEK):
            return  # pipelined bytes of the next request: EOF cannot be watched for
    except OSError:
        pass
    gevent.kill(target, _ClientClosed)


class Simulator:
    """The server: ``sim = Simulator(...).start()``, then ``sim.url``; ``sim.stop()``."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        defaults: Defaults | None = None,
        name: str = "",
    ):
        self.defaults = defaults or Defaults()
        self.name = name  # ``sim:NAME.key=value`` directives apply here only
        self.records: OrderedDict[str, Record] = OrderedDict()
        self.requests = self.chunks = self.open_streams = 0
        self._seen: dict[str, Event] = {}
        self.server = StreamServer((host, port), self._handle)

    @property
    def url(self) -> str:
        return f"http://{self.server.server_host}:{self.server.server_port}"

    def start(self) -> Simulator:
        self.server.start()
        return self

    def stop(self, timeout: float = 1.0) -> None:
        self.server.stop(timeout=timeout)

    def _handle(self, sock: Any, _address: Any) -> None:
        # Like a real API server: each event leaves when written. Without it Nagle's
        # algorithm holds a token written right after the head until the client's
        # delayed ACK (~40 ms on a kept-alive connection).
        sock.setsockopt(IPPROTO_TCP, TCP_NODELAY, 1)
        buf = bytearray()
        try:
            while (req := self._read_request(sock, buf)) and self._dispatch(sock, *req):
                pass
        except _Reject as exc:
            self._error(sock, *exc.args, False)
            sock.shutdown(SHUT_WR)  # lingering close: let the client read the error
            with gevent.Timeout(1, False):
                while sock.recv(65536):
                    pass
        except (_ClientClosed, OSError):
            pass  # the peer went away (a late _ClientClosed can land after its response)
        finally:
            sock.close()

    def _read_request(self, sock: Any, buf: bytearray) -> tuple[Any, ...] | None:
        while (end := buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)) < 0:
            if len(buf) > MAX_HEAD:
                raise _Reject(431, "Request head too large.")
            if not (data := sock.recv(65536)):
                return None
            buf += data
        lines = bytes(buf[:end]).lstrip(b"\r\n").decode("latin-1").split("\r\n")
        del buf[: end + 4]
        try:
            method, target, version = lines[0].split(" ")
            pairs = [line.partition(":") for line in lines[1:]]
            headers = {name.strip().lower(): value.strip() for name, _, value in pairs}
            length = int(headers.get("content-length", "0"))
            if length < 0 or not version.startswith("HTTP/1.") or "" in headers:
                raise ValueError
            if not all(sep for _, sep, _ in pairs):  # a header line without a colon
                raise ValueError
        except ValueError:
            raise _Reject(400, "Malformed HTTP request.") from None
        if "transfer-encoding" in headers:
            raise _Reject(501, "Chunked request bodies are not supported.")
        if length > MAX_BODY:
            raise _Reject(413, "Request body too large.")
        if headers.get("expect", "").lower() == "100-continue":
            sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buf) < length:
            if not (data := sock.recv(max(65536, length - len(buf)))):
                return None
            buf += data
        body = bytes(buf[:length])
        del buf[:length]
        http11 = version == "HTTP/1.1"
        keep = http11 and headers.get("connection", "").lower() != "close"
        return method, target, body, keep, http11

    def _send(self, sock: Any, status: int, body: bytes, keep: bool, extra: str = "") -> bool:
        head = f"HTTP/1.1 {status} {responses.get(status, 'Error')}\r\n{extra}"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        head += "\r\n" if keep else "Connection: close\r\n\r\n"
        sock.sendall(head.encode() + body)
        return keep

    def _error(self, sock: Any, status: int, message: str, keep: bool, extra: str = "") -> bool:
        etype = "server_error" if status >= 500 else "invalid_request_error"
        etype, code = _ERRORS.get(status, (etype, None))
        error = {"message": message, "type": etype, "param": None, "code": code}
        return self._send(sock, status, _dumps({"error": error}), keep, extra)

    def _dispatch(
        self, sock: Any, method: str, target: str, body: bytes, keep: bool, http11: bool
    ) -> bool:
        path, query = (url := urlsplit(target)).path, parse_qs(url.query)
        if path != "/v1/chat/completions" and method != "GET" or method not in ("GET", "POST"):
            return self._error(sock, 405, f"Method {method} not allowed.", keep)
        if path == "/v1/chat/completions" and method == "POST":
            return self._chat(sock, body, keep, http11)
        if path == "/v1/models":
            return self._send(sock, 200, _MODEL_LIST, keep)
        if path == "/_sim/stats":
            stats = {"cpu_seconds": time.process_time(), "requests": self.requests}
            stats |= {"chunks": self.chunks, "open_streams": self.open_streams}
            return self._send(sock, 200, _dumps(stats), keep)
        if path.startswith("/_sim/requests/"):
            tag, wait = unquote(path[15:]), query.get("wait", [""])[0]
            try:
                deadline = time.monotonic() + float(query.get("timeout", ["10"])[0])
            except ValueError:
                return self._error(sock, 400, "timeout must be a number", keep)
            if (rec := self.records.get(tag)) is None and wait in ("seen", "ended"):
                self._seen.setdefault(tag, Event()).wait(max(0, deadline - time.monotonic()))
                rec = self.records.get(tag)
            if rec is not None and wait == "ended":
                rec.done.wait(max(0, deadline - time.monotonic()))
            if rec is None:
                return self._error(sock, 404, f"No request tagged {tag!r} seen.", keep)
            return self._send(sock, 200, _dumps(rec.as_dict()), keep)
        return self._error(sock, 404, f"Unknown request URL: {method} {path}", keep)

    def _chat(self, sock: Any, body: bytes, keep: bool, http11: bool) -> bool:
        try:
            req = json.loads(body)
            messages, model = req["messages"], req["model"]
            max_tokens = req.get("max_completion_tokens")
            max_tokens = req.get("max_tokens") if max_tokens is None else max_tokens
            if not (messages and isinstance(messages, list) and isinstance(model, str)):
                raise ValueError("'messages' must be a non-empty array and 'model' a string.")
            if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
                raise ValueError("max_tokens must be a positive integer.")
            texts = [_text(m.get("content")) if isinstance(m, dict) else "" for m in messages]
            opts, texts[-1] = parse_directives(texts[-1], self.name)
            wanted = opts.get("tokens", self.defaults.tokens)
            items, finish = answer_items(req, texts, opts, wanted)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            message = str(exc) if type(exc) is ValueError else ""
            return self._error(sock, 400, message or "Invalid JSON request body.", keep)
        self.requests += 1
        cid = f"chatcmpl-sim-{self.requests}"
        shown = req if len(body) <= 65536 else None
        rec = Record(opts.get("tag", cid), model, max_tokens, len(messages), shown)
        self.records.pop(rec.tag, None)
        self.records[rec.tag] = rec
        if len(self.records) > MAX_RECORDS:
            self.records.popitem(last=False)
        if (seen := self._seen.pop(rec.tag, None)) is not None:
            seen.set()
        watcher = gevent.spawn(_watch_eof, sock, gevent.getcurrent())
        try:
            if opts.get("hang"):
                gevent.sleep(opts["hang"])
            if "fail" in opts:
                extra = f"Retry-After: {opts['retry_after']:g}\r\n" if "retry_after" in opts else ""
                self._error(sock, opts["fail"], f"Simulated error {opts['fail']}.", keep, extra)
                rec.finish("failed")
                return keep
            n = min(len(items), max_tokens or len(items))
            toks = items[:n]
            prompt = "\n".join(texts)
            usage = {"prompt_tokens": len(prompt.split()) + 3 * len(messages)}
            usage |= {"completion_tokens": n, "total_tokens": usage["prompt_tokens"] + n}
            base = {"id": cid, "object": "", "created": int(time.time()), "model": model}
            finish = "length" if n < len(items) else finish
            rate = opts.setdefault("rate", self.defaults.rate)
            delay = opts.setdefault("delay", self.defaults.delay)
            if req.get("stream"):
                with_usage = (req.get("stream_options") or {}).get("include_usage")
                opts |= {"finish": finish, "usage": usage if with_usage else None, "http11": http11}
                self.open_streams += 1
                try:
                    return self._stream(sock, rec, base, toks, opts) and keep
                finally:
                    self.open_streams -= 1
            seconds = delay + (n / rate if rate > 0 else 0) + opts.get("stall", 0)
            gevent.sleep(seconds)
            if {"close_after", "truncate_after"} & opts.keys():
                rec.finish("aborted")
                return False
            message, logprobs = _message(toks)
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
            base |= {"object": "chat.completion", "choices": [choice], "usage": usage}
            self._send(sock, 200, _dumps(base), keep)
            rec.tokens_sent = n
            rec.finish("completed")
            return keep
        except (_ClientClosed, OSError):
            rec.finish("client_closed")
            return False
        finally:
            watcher.kill()

    def _stream(self, sock: Any, rec: Record, base: dict, toks: list[Any], opts: dict) -> bool:
        """Stream *toks* as SSE chunks; True if the connection remains usable afterwards."""
        finish, usage, http11 = opts["finish"], opts["usage"], opts["http11"]

        def frame(data: bytes) -> bytes:
            return b"%x\r\n%b\r\n" % (len(data), data) if http11 else data

        def event(choices: list[Any], **extra: Any) -> bytes:
            return frame(b"data: " + _dumps({**base, "choices": choices, **extra}) + b"\n\n")

        base["object"] = "chat.completion.chunk"
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
        head += f"x-request-id: {base['id']}\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if http11 else "Connection: close\r\n\r\n"
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        sock.sendall(head.encode() + event([role]))
        rec.chunks_sent += 1
        self.chunks += 1
        choice = {"index": 0, "delta": {"content": ""}, "finish_reason": None}
        prefix, _, suffix = _dumps({**base, "choices": [choice]}).rpartition(b'""},"finish')
        prefix, suffix = b"data: " + prefix, b'},"finish' + suffix + b"\n\n"
        marks: dict[int, list[str]] = {}
        for key in (key for key in _ACTIONS if key in opts):
            marks.setdefault(opts[key], []).append(key)
        sendall, monotonic, cache = sock.sendall, time.monotonic, {}
        interval = 1.0 / opts["rate"] if opts["rate"] > 0 else 0.0
        t0 = monotonic() + opts["delay"]
        for i in range(len(toks) + 1):
            for key in marks.get(i, ()):
                if key == "malformed_after":
                    sendall(frame(b"data: {not json\n\n"))
                    rec.chunks_sent += 1
                    self.chunks += 1
                elif key == "stall_after":
                    started = monotonic()
                    gevent.sleep(opts.get("stall", 0))
                    t0 += monotonic() - started
                else:
                    if key == "truncate_after" and http11:
                        sendall(b"0\r\n\r\n")
                    rec.finish("aborted")
                    return key == "truncate_after"
            if i == len(toks):
                break
            if (pause := t0 + i * interval - monotonic()) > 0:
                gevent.sleep(pause)
            elif i & 15 == 15:
                gevent.sleep(0)  # fairness between back-to-back streams
            if type(tok := toks[i]) is not str:  # a tool call fragment, a refusal, logprobs
                data = event([{"index": 0, **tok, "finish_reason": None}])
            elif (data := cache.get(tok)) is None:
                data = cache[tok] = frame(prefix + _dumps(tok) + suffix)
            sendall(data)
            rec.chunks_sent += 1
            rec.tokens_sent += 1
            self.chunks += 1
        tail = event([{"index": 0, "delta": {}, "finish_reason": finish}])
        tail += b"" if usage is None else event([], usage=usage)
        sendall(tail + frame(b"data: [DONE]\n\n") + (b"0\r\n\r\n" if http11 else b""))
        rec.chunks_sent += 2 if usage is None else 3
        self.chunks += 2 if usage is None else 3
        rec.finish("completed")
        return True


def serve(
    host: str = "127.0.0.1", port: int = 0, defaults: Defaults | None = None, name: str = ""
) -> None:
    """Run a simulator until SIGTERM/SIGINT, announcing its URL on stdout."""
    sim, stop = Simulator(host, port, defaults, name).start(), Event()
    handlers = [gevent.signal_handler(sig, stop.set) for sig in (signal.SIGTERM, signal.SIGINT)]
    print(f"simulator listening on {sim.url}", flush=True)
    try:
        stop.wait()
    finally:
        for handler in handlers:
            handler.cancel()
        sim.stop(timeout=0.5)


def main(argv: list[str] | None = None) -> int:
    from gevent import monkey

    monkey.patch_all()
    parser = argparse.ArgumentParser("python -m devtools.simulator", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=64, help="content tokens per answer")
    parser.add_argument("--rate", type=float, default=40.0, help="tokens/s, 0 = unthrottled")
    parser.add_argument("--delay", type=float, default=0.3, help="seconds before first token")
    parser.add_argument("--name", default="", help="sim:NAME.key=value directives apply here")
    args = parser.parse_args(argv)
    serve(args.host, args.port, Defaults(args.tokens, args.rate, args.delay), args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
