"""gunicorn's logger, with one line instead of a traceback for a dropped slow client.

A client that stops reading makes a write wait `SEND_TIMEOUT_SECONDS` (the
socket timeout `streaming.core.follow.ClientWatch` sets), then fail with a socket
timeout. gunicorn's worker logs every such ``OSError`` with its full traceback
("Socket error processing request."), which for an expected, deliberate drop
is noise that can bury real errors. This logger (gunicorn's documented
``logger_class`` setting, see config/gunicorn.conf.py) logs that case as one
line at info level; every other exception is logged as before.
"""

from __future__ import annotations

import sys

from gunicorn.glogging import Logger

__all__ = ["SluiceLogger"]


class SluiceLogger(Logger):
    def exception(self, msg, *args, **kwargs) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, TimeoutError):  # socket.timeout is TimeoutError
            self.info("client dropped: a write to it timed out (SEND_TIMEOUT_SECONDS)")
            return
        super().exception(msg, *args, **kwargs)
