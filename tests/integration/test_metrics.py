"""Prometheus metrics (server.metrics_listen, server/metrics.py) of a real daemon, scraped
over HTTP on loopback and parsed with prometheus-client's own parser: every call the pipeline
ran is counted by method and status, whichever serving process ran it, refused calls
included, and signatures are counted per digest."""

from __future__ import annotations

import hashlib
import json
import socket
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness.daemons import Daemon, start_daemon
from tests.harness.tokens import token_with_keys

DIGEST = hashlib.sha256(b"hsmsign metrics").digest()
SHA256 = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256


def _metrics_address(d: Daemon) -> str:
    ready = json.loads((d.tmp / "ready.json").read_text())
    address: str = ready["metrics"]
    return address


#: A scrape's samples by (name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(d: Daemon) -> Samples:
    """Every sample of the daemon's /metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://{_metrics_address(d)}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _calls(samples: Samples, method: str, status: str) -> float:
    return samples.get(("hsmsign_calls_total", (("method", method), ("status", status))), 0.0)


def _sign(address: str, key: str, digests: int = 0, digest: bytes = DIGEST) -> grpc.StatusCode:
    """One call on a connection of its own (the kernel picks the serving process)."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        stub = pb_grpc.SignerStub(ch)
        try:
            if digests:
                stub.SignDigests(
                    pb.SignDigestsRequest(
                        key=pb.KeyRef(name=key), algorithm=SHA256, digests=[DIGEST] * digests
                    ),
                    timeout=30,
                )
            else:
                stub.SignDigest(
                    pb.SignDigestRequest(key=pb.KeyRef(name=key), algorithm=SHA256, digest=digest),
                    timeout=30,
                )
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("processes", [1, 2])
def test_calls_and_signatures_are_counted_across_serving_processes(
    tmp_path: Path, processes: int
) -> None:
    _token, cfg = token_with_keys(
        tmp_path / "t",
        ["demo"],
        extra=f'[server]\nprocesses = {processes}\nmetrics_listen = "127.0.0.1:0"\n',
    )
    d = start_daemon(cfg, tmp_path / "d")
    try:
        before = _scrape(d)
        for _ in range(12):
            assert _sign(d.address, "demo") is grpc.StatusCode.OK
        for _ in range(3):
            assert _sign(d.address, "no-such-key") is grpc.StatusCode.NOT_FOUND
        assert _sign(d.address, "demo", digests=40) is grpc.StatusCode.OK
        # Over server.limits.max_small_request_bytes: refused by hsmsign, and counted.
        oversized = _sign(d.address, "demo", digest=b"x" * 70_000)
        assert oversized is grpc.StatusCode.RESOURCE_EXHAUSTED
        after = _scrape(d)
        if processes == 2:
            workers = json.loads((d.tmp / "ready.json").read_text())["workers"]
            assert len(workers) == 2
        got = {
            (m, s): _calls(after, m, s) - _calls(before, m, s)
            for m, s in (
                ("SignDigest", "OK"),
                ("SignDigest", "NOT_FOUND"),
                ("SignDigest", "RESOURCE_EXHAUSTED"),
                ("SignDigests", "OK"),
            )
        }
        assert got == {
            ("SignDigest", "OK"): 12,
            ("SignDigest", "NOT_FOUND"): 3,
            ("SignDigest", "RESOURCE_EXHAUSTED"): 1,
            ("SignDigests", "OK"): 1,
        }
        made = after[("hsmsign_signatures_total", ())] - before.get(
            ("hsmsign_signatures_total", ()), 0.0
        )
        assert made == 12 + 40
        count = ("hsmsign_call_duration_seconds_count", (("method", "SignDigest"),))
        assert after[count] - before.get(count, 0.0) == 16
        d.wait_log("metrics on http://")
    finally:
        assert d.stop() == 0


def test_a_taken_metrics_port_stops_the_start_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _token, cfg = token_with_keys(
            tmp_path / "t", ["demo"], extra=f'[server]\nmetrics_listen = "127.0.0.1:{port}"\n'
        )
        with pytest.raises(AssertionError) as e:
            start_daemon(cfg, tmp_path / "d")
    message = str(e.value)
    assert f"cannot serve metrics on 127.0.0.1:{port} (server.metrics_listen)" in message
    assert "Traceback" not in message


def test_without_metrics_listen_there_is_no_endpoint(tmp_path: Path) -> None:
    _token, cfg = token_with_keys(tmp_path / "t", ["demo"])
    d = start_daemon(cfg, tmp_path / "d")
    try:
        assert "metrics" not in json.loads((d.tmp / "ready.json").read_text())
        assert _sign(d.address, "demo") is grpc.StatusCode.OK
    finally:
        assert d.stop() == 0
