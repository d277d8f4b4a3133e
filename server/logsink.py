"""The human log's way to stderr: a bounded queue drained by one thread, so that serving
never waits for stderr. A pipe nobody reads, a full disk or /dev/full only cost log lines:
when the queue is full a line is dropped and counted, and the count is reported in the log
once lines flow again. The audit trail (server/audit/) is the record; this is not.
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import time

#: Lines held for a slow stderr before new ones are dropped.
CAPACITY = 10_000


class StderrSink:
    """Writes whole lines to ``fd`` from a background thread. ``write`` never blocks."""

    def __init__(self, fd: int, capacity: int = CAPACITY) -> None:
        self.fd, self.capacity = fd, capacity
        self._lines: collections.deque[bytes] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        #: Lines dropped (queue full, or stderr refused them), since start.
        self.dropped = 0
        self._unreported = 0
        self._queued = self._finished = 0  # lines accepted, and written or lost
        self._thread = threading.Thread(target=self._drain, name="stderr", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        with self._ready:
            if len(self._lines) >= self.capacity:
                self.dropped += 1
                self._unreported += 1
                return
            self._lines.append(line)
            self._queued += 1
            self._ready.notify()

    def _drain(self) -> None:
        while True:
            with self._ready:
                while not self._lines:
                    self._ready.wait()
                line = self._lines.popleft()
                unreported, self._unreported = self._unreported, 0
            if unreported:
                note = f"hsmsignd: {unreported} log lines dropped (stderr was not keeping up)\n"
                self._write(note.encode())
            written = self._write(line)
            with self._ready:
                self._finished += 1
                if not written:
                    self.dropped += 1

    def _write(self, data: bytes) -> bool:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:
            return False  # closed pipe, ENOSPC, /dev/full: the line is lost, serving goes on
        return True

    def flush(self, timeout: float) -> None:
        """Waits up to ``timeout`` seconds for the queued lines to be written (at exit)."""
        deadline = time.monotonic() + timeout
        while self._finished < self._queued and time.monotonic() < deadline:
            time.sleep(0.005)


class TextStream:
    """The sink as a text stream, for ``logging.StreamHandler``."""

    def __init__(self, sink: StderrSink) -> None:
        self.sink = sink

    def write(self, text: str) -> int:
        self.sink.write(text.encode("utf-8", errors="replace"))
        return len(text)

    def flush(self) -> None:
        pass


_sinks: dict[int, StderrSink] = {}
_sinks_lock = threading.Lock()


def sink(fd: int) -> StderrSink:
    """The process's one sink for ``fd`` (made on first use; drained for 1 s at exit)."""
    with _sinks_lock:
        s = _sinks.get(fd)
        if s is None:
            s = _sinks[fd] = StderrSink(fd)
            atexit.register(s.flush, 1.0)
        return s


def flush_all(timeout: float) -> None:
    """Waits up to ``timeout`` seconds for every sink's queued lines (before ``os._exit``,
    which runs no atexit handlers)."""
    with _sinks_lock:
        sinks = list(_sinks.values())
    for s in sinks:
        s.flush(timeout)
