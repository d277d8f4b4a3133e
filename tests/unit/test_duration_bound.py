"""A destruction delay too long for a protobuf Duration is a usage error, not a traceback."""

from __future__ import annotations

import subprocess

from tests.conftest import HSMSIGN


def test_huge_delay_is_a_usage_error() -> None:
    args = ["keys", "schedule-destroy", "demo", "1", "--delay", "9999999999999999999d"]
    r = subprocess.run(
        [HSMSIGN, "--server", "127.0.0.1:1", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "too long" in r.stderr
