"""The upstream's httpx transport, built only on documented extension points.

httpx documents "Custom transports" (subclass `BaseTransport`, implement
``handle_request``) and httpcore documents "Custom network backends" (a
`NetworkBackend` given to its pools). `UpstreamTransport` is the first over
the second: an httpcore pool (`ConnectionPool`, or `HTTPProxy` when a proxy
applies) built with our `streaming.upstream.net.NonYieldingBackend`, wrapped as
httpx's own `HTTPTransport` wraps its pool. Nothing private is replaced.

Proxies. A client given ``transport=`` ignores the environment's proxies, so
the transport applies them itself, the way an httpx client would for the
upstream's URL: ``HTTPS_PROXY`` (``HTTP_PROXY`` for an http:// upstream), else
``ALL_PROXY``; none when ``NO_PROXY`` names the host (`proxy_for`, read with
the standard library's own environment parsing). The upstream's URL is fixed
per client, so one pool serves it.
"""

from __future__ import annotations

import contextlib
import ssl
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpcore2
import httpx2

from streaming.upstream.net import NonYieldingBackend

__all__ = ["UpstreamTransport", "proxy_for"]

# httpcore's exceptions -> httpx's, as httpx's HTTPTransport maps them (the openai
# SDK turns httpx's into APITimeoutError / APIConnectionError).
_EXCEPTIONS: list[tuple[type[Exception], type[Exception]]] = [
    (httpcore2.ConnectTimeout, httpx2.ConnectTimeout),
    (httpcore2.ReadTimeout, httpx2.ReadTimeout),
    (httpcore2.WriteTimeout, httpx2.WriteTimeout),
    (httpcore2.PoolTimeout, httpx2.PoolTimeout),
    (httpcore2.TimeoutException, httpx2.TimeoutException),
    (httpcore2.ConnectError, httpx2.ConnectError),
    (httpcore2.ReadError, httpx2.ReadError),
    (httpcore2.WriteError, httpx2.WriteError),
    (httpcore2.NetworkError, httpx2.NetworkError),
    (httpcore2.ProxyError, httpx2.ProxyError),
    (httpcore2.UnsupportedProtocol, httpx2.UnsupportedProtocol),
    (httpcore2.RemoteProtocolError, httpx2.RemoteProtocolError),
    (httpcore2.LocalProtocolError, httpx2.LocalProtocolError),
    (httpcore2.ProtocolError, httpx2.ProtocolError),
]


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for core_exc, httpx_exc in _EXCEPTIONS:
            if isinstance(exc, core_exc):
                raise httpx_exc(str(exc)) from exc
        raise


def proxy_for(url: str) -> str | None:
    """The proxy URL an httpx client would take from the environment for `url`, or None."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if parts.hostname and urllib.request.proxy_bypass_environment(parts.hostname, proxies):
        return None
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = "http://" + proxy  # as httpx reads a bare host:port
    return proxy or None


class _Body(httpx2.SyncByteStream):
    """httpcore's response stream as httpx's, with its errors mapped."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        with _mapped():
            yield from self._stream

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            with _mapped():
                close()


class UpstreamTransport(httpx2.BaseTransport):
    """One pooled transport to the upstream, on `NonYieldingBackend`, proxied if the
    environment says so for `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        max_keepalive_connections: int,
        keepalive_expiry: float | None = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ):
        self.network = NonYieldingBackend()
        self.proxy = proxy_for(base_url)
        ssl_context = ssl_context or httpx2.create_ssl_context()
        common = {
            "ssl_context": ssl_context,
            "max_connections": None,
            "max_keepalive_connections": max_keepalive_connections,
            "keepalive_expiry": keepalive_expiry,
            "network_backend": self.network,
        }
        if self.proxy is None:
            self.pool: httpcore2.ConnectionPool = httpcore2.ConnectionPool(**common)
        else:
            proxy = httpx2.URL(self.proxy)
            if proxy.scheme not in ("http", "https"):
                raise ValueError(
                    f"proxy {proxy.scheme}:// for the upstream is not supported (http or https)"
                )
            self.pool = httpcore2.HTTPProxy(
                proxy_url=httpcore2.URL(
                    scheme=proxy.raw_scheme,
                    host=proxy.raw_host,
                    port=proxy.port,
                    target=proxy.raw_path,
                ),
                proxy_auth=(proxy.username, proxy.password) if proxy.username else None,
                **common,
            )

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        core_request = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _mapped():
            response = self.pool.handle_request(core_request)
        return httpx2.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.pool.close()
