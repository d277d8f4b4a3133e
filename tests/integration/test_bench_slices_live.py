"""Part 3c's kept-up processes (bench/slices.py) against a real token and daemon: the token
probe and the load driver each sign only in the slices they are told to run, answer each
with one JSON line, and stop when told to."""

from __future__ import annotations

from bench.run import _token_args
from bench.slices import Kept, connection_split
from tests.conftest import Daemon, TokenDir


def test_the_probe_and_the_driver_sign_in_slices_and_stop(token: TokenDir, daemon: Daemon) -> None:
    probe = Kept(
        ["-m", "bench.inprocess", "token-slices", *_token_args(token, "demo"), "--threads", "1"],
        "token probe",
    )
    driver = Kept(
        [
            "-m",
            "bench.slices",
            "load",
            "--target",
            daemon.address,
            "--key",
            "demo",
            "--callers",
            "2",
            "--batch",
            "16",
            "--daemon-pid",
            str(daemon.proc.pid),
        ],
        "load driver",
    )
    try:
        assert sum(connection_split(driver.proc.pid, daemon.proc.pid)) == 2
        for _ in range(2):
            p = probe.run(0.3)
            assert p["ops"] > 0 and p["signed"] >= p["ops"] - 1 and p["threads"] == 1
            d = driver.run(0.5)
            assert d["errors"] == {} and d["calls"] >= 2 and d["signatures"] > 0
            # Counted by overlap: never more than the calls made, within the window's rate.
            assert d["signatures"] <= d["signed"]
            assert d["daemon_window_cpu_seconds"] is not None
            assert d["wall_seconds"] >= 0.5
    finally:
        probe.stop()
        driver.stop()
    assert probe.proc.returncode == 0 and driver.proc.returncode == 0
