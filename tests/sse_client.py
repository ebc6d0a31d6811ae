"""A small blocking SSE client for tests (http.client: we control the socket)."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

from streaming.sse import parse


class EventStream:
    def __init__(
        self,
        base: str,
        path: str,
        body: object = None,
        method: str = "POST",
        headers: dict[str, str] | None = None,
        timeout: float = 20.0,
        raw: bytes | None = None,
    ):
        url = urlsplit(base)
        self.conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
        self.conn.connect()
        self.local_port = self.conn.sock.getsockname()[1]
        hdrs = {"Content-Type": "application/json"} if method == "POST" else {}
        hdrs.update(headers or {})
        payload = raw if raw is not None else (json.dumps(body) if body is not None else None)
        self.conn.request(method, path, body=payload, headers=hdrs)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.headers = {k.lower(): v for k, v in self.resp.getheaders()}
        self.text = ""  # everything received so far
        self._pending = ""
        self.events: list[dict] = []
        self.pings = 0
        self.broken = False

    @property
    def stream_id(self) -> str:
        return self.headers["x-stream-id"]

    def json(self) -> dict:
        data = self.resp.read()
        self.close()
        return json.loads(data)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_more(self) -> bool:
        try:
            chunk = self.resp.read1(65536)
        except (http.client.IncompleteRead, ConnectionError):
            self.broken = True  # the server went away mid-body (a killed worker)
            return False
        if not chunk:
            return False
        decoded = chunk.decode()
        self.text += decoded
        self._pending += decoded
        return True

    def next_event(self) -> dict | None:
        """The next event (data decoded from JSON), or None at the end of the body."""
        while True:
            while "\n\n" in self._pending:
                frame, self._pending = self._pending.split("\n\n", 1)
                if frame.startswith(":"):
                    self.pings += frame.count(": ping")
                    continue
                parsed = parse(frame + "\n\n")
                if not parsed:  # a block without data: the opening "retry: 1000"
                    continue
                event = parsed[0]
                event["data"] = json.loads(event["data"])
                self.events.append(event)
                return event
            if not self._read_more():
                self.close()
                return None

    def until(self, name: str) -> dict:
        while (event := self.next_event()) is not None:
            if event["event"] == name:
                return event
        raise AssertionError(f"stream ended without {name!r}: {self.events}")

    def read_all(self) -> list[dict]:
        while self.next_event() is not None:
            pass
        return self.events

    def close(self) -> None:
        """Drop the connection, as a closed browser tab does."""
        self.resp.close()
        self.conn.close()


def request(
    base: str,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 20.0,
) -> tuple[int, dict, dict]:
    """One plain request; returns status, lower-cased headers and the JSON body (or {})."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    payload = raw if raw is not None else (json.dumps(body) if body is not None else None)
    conn.request(method, path, body=payload, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    headers_out = {k.lower(): v for k, v in resp.getheaders()}
    return resp.status, headers_out, (json.loads(data) if data else {})
