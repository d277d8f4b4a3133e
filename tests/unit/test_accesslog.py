"""The access log's direct writer: the same line as the logging format, one write per line."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

import pytest

from server import logsink, main
from server.api import accesslog

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO \[1/2\] hsmsign\.access: "
    r"SignDigest peer=ipv4:127\.0\.0\.1:5 status=OK key=demo@1 ms=1\.5$"
)


class DaemonStderr:
    """A pipe standing in for the daemon's stderr; ``setup`` configures the daemon's logging
    on it (inside the test: pytest swaps sys.stderr back in at the start of each phase)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.r, self.w = os.pipe()
        self.stream = os.fdopen(self.w, "w")
        self._monkeypatch = monkeypatch

    def setup(self, level: str, tag: str = "[1/2] ") -> None:
        self._monkeypatch.setattr(sys, "stderr", self.stream)
        logging.getLogger().handlers.clear()  # pytest's would make basicConfig a no-op
        main._setup_logging(level, tag)

    def read(self) -> str:
        logsink.sink(self.w).flush(5)  # lines reach stderr from the sink's thread
        return os.read(self.r, 65536).decode()


@pytest.fixture
def stderr(monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonStderr]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    pipe = DaemonStderr(monkeypatch)
    try:
        yield pipe
    finally:
        root.handlers[:], root.level = saved
        accesslog.access.fd = None
        os.close(pipe.r)
        pipe.stream.close()


def test_a_line_matches_the_logging_format(stderr: DaemonStderr) -> None:
    stderr.setup("INFO")
    accesslog.access.line("SignDigest", "ipv4:127.0.0.1:5", "OK", "demo@1", 1.5)
    written = stderr.read()
    assert LINE.match(written.rstrip("\n")), written
    # The same line through the logging module, for comparison: all but the time agree.
    logging.getLogger("hsmsign.access").info(
        "%s peer=%s status=%s key=%s ms=%.1f", "SignDigest", "ipv4:127.0.0.1:5", "OK", "demo@1", 1.5
    )
    via_logging = stderr.read()
    assert via_logging[23:] == written[23:]


def test_above_info_writes_nothing(stderr: DaemonStderr) -> None:
    stderr.setup("WARNING")
    accesslog.access.line("SignDigest", "p", "OK", "-", 1.0)
    os.write(stderr.w, b"end")
    assert stderr.read() == "end"


def test_unconfigured_lines_go_through_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    accesslog.access.fd = None
    with caplog.at_level(logging.INFO, logger="hsmsign.access"):
        accesslog.access.line("GetPublicKey", "p", "NOT_FOUND", "-", 0.2)
    assert caplog.messages == ["GetPublicKey peer=p status=NOT_FOUND key=- ms=0.2"]


def test_lines_from_many_threads_stay_whole(stderr: DaemonStderr) -> None:
    fcntl.fcntl(stderr.w, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for every line: no reader needed
    stderr.setup("INFO")

    def calls() -> None:
        for _ in range(200):
            accesslog.access.line("SignDigest", "ipv4:127.0.0.1:5", "OK", "demo@1", 1.5)

    threads = [threading.Thread(target=calls) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logsink.sink(stderr.w).flush(5)
    os.set_blocking(stderr.r, False)
    chunks = []
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(stderr.r, 1 << 20):
            chunks.append(chunk)
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 1600
    assert all(LINE.match(line) for line in lines)


def test_a_closed_stderr_does_not_fail_the_call(stderr: DaemonStderr) -> None:
    stderr.setup("INFO", "")
    read_only = os.open(os.devnull, os.O_RDONLY)
    accesslog.access.fd = read_only  # every write fails (EBADF), as on a closed stderr
    try:
        accesslog.access.line("SignDigest", "p", "OK", "-", 1.0)  # no exception
    finally:
        os.close(read_only)
