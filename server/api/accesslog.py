"""The access log: one line per call, handed to the non-blocking stderr sink.

Every call writes one line, so this is the only output on the signing path. Through the
logging module a line costs more than the rest of hsmsign's per-call Python (a LogRecord,
the Formatter, the handler's lock held across the write; docs/performance.md). Here a line
is one f-string handed to ``server.logsink``, whose thread writes it to stderr: a stderr
nobody reads (a full pipe) or one that fails (/dev/full) drops and counts lines, and never
stalls a call. The audit trail, not this log, is the record of calls.

The line is the same as the logging format's (``server.main._setup_logging``)::

    2026-11-26 14:31:07,412 INFO [1/2] hsmsign.access: SignDigest peer=ipv4:... status=OK ...

Until ``configure`` is called (the daemon calls it at start-up when its level is INFO or
lower) lines go through the ``hsmsign.access`` logger, so code that uses the servicers
in-process still logs the usual way.
"""

from __future__ import annotations

import logging
import time

from server import logsink

LOGGER_NAME = "hsmsign.access"
_logger = logging.getLogger(LOGGER_NAME)

#: (second, "YYYY-MM-DD HH:MM:SS") of the last line: strftime once per second, not per line.
_second: tuple[int, str] = (-1, "")


def timestamp(created: float) -> str:
    """``created`` as logging's default asctime (local time, milliseconds after a comma)."""
    global _second
    second = int(created)
    cached = _second
    if cached[0] != second:
        cached = (second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        _second = cached
    return f"{cached[1]},{int((created - second) * 1000):03d}"


class _Writer:
    def __init__(self) -> None:
        self.fd: int | None = None
        self.prefix = ""

    def configure(self, fd: int, tag: str = "") -> None:
        """Writes lines straight to ``fd`` from now on, if the logger is enabled for INFO."""
        if _logger.isEnabledFor(logging.INFO):
            self.fd, self.prefix = fd, f" INFO {tag}{LOGGER_NAME}: "
        else:
            self.fd = None

    def line(self, method: str, peer: str, status: str, keys: str, ms: float) -> None:
        fd = self.fd
        if fd is None:
            _logger.info("%s peer=%s status=%s key=%s ms=%.1f", method, peer, status, keys, ms)
            return
        data = (
            f"{timestamp(time.time())}{self.prefix}{method} peer={peer} status={status} "
            f"key={keys} ms={ms:.1f}\n"
        ).encode()
        logsink.sink(fd).write(data)  # never blocks: a stalled stderr drops lines, not calls


#: The daemon's access log.
access = _Writer()
