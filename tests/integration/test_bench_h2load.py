"""The bench's h2load driver (bench/h2load.py) against a real daemon: it measures calls and
latencies, and gRPC errors (HTTP 200 with a grpc-status trailer, invisible to h2load) are
caught from the daemon's access log, once the run's lines have landed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.h2load import (
    H2Spec,
    failed_calls,
    failed_during,
    grpc_frame,
    run_h2load,
    run_h2load_paced,
)
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.conftest import Daemon
from tests.harness.daemons import start_daemon
from tests.harness.faults import launcher, write_plan


@pytest.fixture(scope="module")
def late_log(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """A daemon whose log lines land 3 s after they were logged (no faults): the last
    lines of a run reach the file after h2load has exited, as on a loaded host."""
    tmp = tmp_path_factory.mktemp("late-log")
    write_plan(tmp / "plan.json")
    d = start_daemon(config, tmp / "d", command=launcher(tmp / "plan.json", log_delay=3.0))
    yield d
    d.stop()


def _body(key: str) -> bytes:
    return grpc_frame(
        pb.SignDigestRequest(
            key=pb.KeyRef(name=key),
            algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
            digest=hashlib.sha256(b"bench").digest(),
        )
    )


def test_h2load_measures_real_calls(daemon: Daemon) -> None:
    before = failed_calls(daemon.log(), "SignDigest")
    r = run_h2load(
        H2Spec(daemon.address, "hsmsign.v1.Signer/SignDigest", 2, 1, duration=1),
        _body("demo"),
        daemon.proc.pid,
    )
    assert r["calls"] > 10 and r["http_failed"] == 0
    assert r["p50_ms"] is not None and 0 < r["p50_ms"] <= r["p99_ms"]
    assert r["daemon_cpu_seconds"] > 0 and r["client_cpu_seconds"] > 0
    assert failed_calls(daemon.log(), "SignDigest") == before


def test_grpc_errors_are_counted_from_the_access_log(late_log: Daemon) -> None:
    before = late_log.log()
    r = run_h2load(
        H2Spec(late_log.address, "hsmsign.v1.Signer/SignDigest", 1, 1, duration=1),
        _body("no-such-key"),
    )
    assert r["calls"] > 0  # h2load counts them as successes: HTTP 200
    failed = failed_during(late_log.log, "SignDigest", before, r["calls"])
    assert failed.get("NOT_FOUND", 0) >= r["calls"]


def test_paced_load_keeps_its_rate(daemon: Daemon) -> None:
    r = run_h2load_paced(
        daemon.address,
        "hsmsign.v1.Signer/SignDigest",
        _body("demo"),
        rate=40,
        duration=2,
        connections=2,
        warmup=0.5,
    )
    # An even schedule at 40 calls/s over 2 s: about 80 calls, every one answered.
    assert 60 <= r["calls"] <= 100 and r["http_failed"] == 0
    assert r["p50_ms"] is not None and r["p50_ms"] < 1000
