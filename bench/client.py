"""A small blocking HTTP/1.1 client on raw sockets, for the one-at-a-time benchmarks.

Cancel and disconnect tries need exact control of the sockets (which worker
accepted a connection, when the close happens) and timestamps of the very
receive that carried a frame; a few helpers over `socket` do that. The load
benchmark uses its own gevent client (bench/loadgen.py).
"""

from __future__ import annotations

import json
import select
import socket
import time

__all__ = ["Conn", "delete_request", "direct_request", "post_request", "wait_readable"]

SLUICE_PATH = "/api/v1/completions/stream"


def _request(method: str, path: str, port: int, body: dict | None = None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


def post_request(port: int, prompt: str) -> bytes:
    """Start a stream on Sluice or the common design (same route and body)."""
    return _request("POST", SLUICE_PATH, port, {"prompt": prompt})


def direct_request(port: int, prompt: str) -> bytes:
    """Start a stream on the simulator itself."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]}
    return _request("POST", "/v1/chat/completions", port, {**body, "stream": True})


def delete_request(port: int, stream_id: str) -> bytes:
    return _request("DELETE", f"{SLUICE_PATH}/{stream_id}", port)


class Conn:
    """One connection to 127.0.0.1:port; `buf` holds what was received and not consumed."""

    def __init__(self, port: int, timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.local_port = self.sock.getsockname()[1]
        self.buf = b""
        self.head = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bool:
        """One receive into `buf`; False at EOF."""
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_head(self, deadline: float) -> int:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._wait(deadline)
            if not self.recv():
                raise EOFError("closed before the response head")
        self.head, self.buf = self.buf[:end], self.buf[end + 4 :]
        lines = self.head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        return self.status

    def read_until(self, marker: bytes, deadline: float) -> float:
        """Receive until `marker` is in `buf`; returns the time.time() of that receive."""
        at = time.time()
        while marker not in self.buf:
            self._wait(deadline)
            if not self.recv():
                raise EOFError(f"closed before {marker!r}")
            at = time.time()
        return at

    def read_body(self, deadline: float) -> bytes:
        """The rest of a Content-Length body."""
        length = int(self.headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._wait(deadline)
            if not self.recv():
                break
        body, self.buf = self.buf[:length], self.buf[length:]
        return body

    def _wait(self, deadline: float) -> None:
        left = deadline - time.time()
        if left <= 0 or not select.select([self.sock], [], [], left)[0]:
            raise TimeoutError("no answer in time")

    def close(self) -> None:
        self.sock.close()


def wait_readable(conns: list[Conn], deadline: float) -> list[Conn]:
    left = max(0.0, deadline - time.time())
    ready = select.select([c.sock for c in conns], [], [], left)[0]
    return [c for c in conns if c.sock in ready]
