"""The human log never blocks serving: a stderr nobody reads, or one that always fails."""

from __future__ import annotations

import os
import time

from server.logsink import StderrSink


def test_a_pipe_nobody_reads_drops_and_counts_lines_instead_of_blocking() -> None:
    r, w = os.pipe()
    try:
        sink = StderrSink(w, capacity=1000)
        t0 = time.monotonic()
        for i in range(20_000):  # far more than a 64 KiB pipe holds
            sink.write(f"line {i} {'x' * 100}\n".encode())
        assert time.monotonic() - t0 < 5
        assert sink.dropped > 10_000
    finally:
        os.close(r)
        os.close(w)


def test_dev_full_loses_lines_without_raising() -> None:
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        sink = StderrSink(fd)
        for _ in range(100):
            sink.write(b"a line\n")
        sink.flush(5)
        assert sink.dropped == 100
    finally:
        os.close(fd)


def test_lines_after_a_stall_report_how_many_were_dropped() -> None:
    r, w = os.pipe()
    try:
        sink = StderrSink(w, capacity=10)
        for _ in range(10_000):
            sink.write(b"y" * 200 + b"\n")
        os.set_blocking(r, False)
        text = b""
        deadline = time.monotonic() + 10
        while b"log lines dropped" not in text and time.monotonic() < deadline:
            try:
                text += os.read(r, 1 << 16)
            except BlockingIOError:
                sink.write(b"later\n")
                time.sleep(0.01)
        assert b"log lines dropped (stderr was not keeping up)" in text
    finally:
        os.close(r)
        os.close(w)
