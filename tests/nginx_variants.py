"""Misconfigured variants of the bundled nginx.conf, for the stream doctor's tests.

Each takes the rendered site (tests/test_nginx.py `render_site`) and returns it
with one mistake that operators make, asserted to apply exactly once so that a
change to nginx.conf fails loudly here instead of testing nothing.
"""

from __future__ import annotations

import re

__all__ = ["buffering", "gzip_buffered", "gzip_streams", "short_read_timeout"]

# the server-level read timeout (the stream locations set their own, indented deeper)
_SERVER_READ_TIMEOUT = re.compile(r"(?m)^    proxy_read_timeout \S+;.*$")


def _once(pattern: re.Pattern[str], text: str, replace) -> str:
    found = pattern.findall(text)
    assert len(found) == 1, f"nginx.conf should contain {pattern.pattern!r} once: {found}"
    return pattern.sub(replace, text)


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"nginx.conf should contain {old!r} exactly once"
    return text.replace(old, new)


def buffering(site: str) -> str:
    """Response buffering forced on everywhere (Sluice's X-Accel-Buffering ignored, big
    buffers) with nginx's default HTTP/1.0 to the backend, as a hand-written location has it.

    Found on nginx 1.22: with buffering on, an unchunked (HTTP/1.0) response waits in the
    buffers until it ends, while a chunked one (proxy_http_version 1.1) still leaves chunk by
    chunk; gzip holds either (`gzip_buffered`).
    """
    site = site.replace("proxy_buffering off;", "proxy_buffering on;")  # the stream locations
    site = _replace_once(site, "proxy_http_version 1.1;", "proxy_http_version 1.0;")
    return _buffers_on(site)


def _buffers_on(site: str) -> str:
    return _once(
        _SERVER_READ_TIMEOUT,
        site,
        lambda m: (
            m.group(0) + "\n    proxy_ignore_headers X-Accel-Buffering;"
            "\n    proxy_buffering on;\n    proxy_buffer_size 64k;\n    proxy_buffers 8 64k;"
        ),
    )


def gzip_streams(site: str) -> str:
    """text/event-stream added to gzip_types (nginx's gzip flushes per write when unbuffered)."""
    return _replace_once(
        site, "gzip_types application/json", "gzip_types text/event-stream application/json"
    )


def gzip_buffered(site: str) -> str:
    """Compressed, with buffering forced on (over HTTP/1.1 to the backend: gzip alone holds)."""
    site = site.replace("proxy_buffering off;", "proxy_buffering on;")
    return gzip_streams(_buffers_on(site))


def short_read_timeout(seconds: int):
    """The server-level proxy_read_timeout (the one / inherits) below the ping interval."""

    def edit(site: str) -> str:
        return _once(_SERVER_READ_TIMEOUT, site, lambda m: f"    proxy_read_timeout {seconds}s;")

    return edit
