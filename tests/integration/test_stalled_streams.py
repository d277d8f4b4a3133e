"""Slow or stalled clients cost no worker (issue 17, DESIGN fact 11).

HTTP/2 streams that send a call's headers and then nothing (or part of a body) must neither
hold a serving thread nor stop a legitimate caller or a health check; and such a stream is
ended by the daemon after ``[server.limits] max_request_receive_seconds``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.harness import Daemon, TokenDir, start_daemon, write_config
from tests.harness.calls import sign_status
from tests.harness.h2raw import RawH2Connection

SIGN = "/hsmsign.v1.Signer/SignDigest"
BATCH = "/hsmsign.v1.Signer/SignDigests"


def _daemon(token: TokenDir, tmp: Path, server: str = "", limits: str = "") -> Daemon:
    config = write_config(
        tmp / "hsmsignd.toml",
        token,
        extra=f"[server]\n{server}\n[server.limits]\n{limits}",
    )
    return start_daemon(config, tmp / "run")


@contextlib.contextmanager
def _stalled(
    address: str, connections: int, streams: int
) -> Iterator[list[tuple[RawH2Connection, list[int]]]]:
    """``connections`` raw connections with ``streams`` calls each: headers only, or headers
    and the first bytes of a body that never comes (a gRPC frame header announcing 600 KB)."""
    opened: list[tuple[RawH2Connection, list[int]]] = []
    try:
        for _ in range(connections):
            conn = RawH2Connection(address)
            ids = []
            for i in range(streams):
                partial = b"\0" + (600_000).to_bytes(4, "big") + b"\x0a" if i % 2 else b""
                ids.append(conn.open_call(BATCH if i % 2 else SIGN, partial))
            opened.append((conn, ids))
        yield opened
    finally:
        for conn, _ in opened:
            conn.close()


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status: int = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
        return status


@pytest.mark.parametrize(
    ("processes", "connections", "streams"),
    [(1, 2, 16), (2, 12, 8)],
    ids=["one-process", "two-processes"],
)
def test_stalled_streams_do_not_stop_legitimate_callers(
    token: TokenDir, tmp_path: Path, processes: int, connections: int, streams: int
) -> None:
    # 8 threads per process (4 sessions); far more stalled streams than that.
    d = _daemon(token, tmp_path, f"processes = {processes}")
    try:
        with _stalled(d.address, connections, streams):
            for _ in range(6):  # fresh clients, so both processes get some
                with grpc.insecure_channel(d.address) as channel:
                    assert sign_status(channel, timeout=15) == (grpc.StatusCode.OK, "")
                assert _health(d.address) == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert d.stop() == 0


def test_a_stalled_stream_is_ended_after_the_receive_bound(token: TokenDir, tmp_path: Path) -> None:
    d = _daemon(token, tmp_path, "processes = 1", "max_request_receive_seconds = 1.0")
    try:
        with _stalled(d.address, 1, 4) as opened:
            conn, ids = opened[0]
            assert conn.wait_ended(ids, timeout=20), f"streams still open: {ids} vs {conn.ended}"
            # The daemon ended the streams, not the connection: the peer may still call.
            assert not conn.closed.is_set()
        with grpc.insecure_channel(d.address) as channel:
            assert sign_status(channel, timeout=15) == (grpc.StatusCode.OK, "")
    finally:
        assert d.stop() == 0
    assert "status=DEADLINE_EXCEEDED" in d.log()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_health_on_its_own_port(token: TokenDir, tmp_path: Path) -> None:
    health_address = f"127.0.0.1:{_free_port()}"
    d = _daemon(token, tmp_path, f'processes = 1\nhealth_listen = "{health_address}"')
    try:
        # Probes get the daemon's health there, even while its serving port is flooded.
        with _stalled(d.address, 2, 16):
            assert _health(health_address) == health_pb2.HealthCheckResponse.SERVING
        # Only health: no signing on that port.
        with grpc.insecure_channel(health_address) as channel:
            code, _details = sign_status(channel, timeout=10)
        assert code == grpc.StatusCode.UNIMPLEMENTED
    finally:
        assert d.stop() == 0


def test_a_call_whose_deadline_passes_before_its_request_is_read_is_counted(
    token: TokenDir, tmp_path: Path
) -> None:
    """gRPC ends such a call itself, so it never reaches the pipeline (no log line, no audit
    record: a flood of doomed calls must not cost one each); the serving process counts them
    and says how many when it stops."""
    d = _daemon(token, tmp_path, "processes = 1")
    try:
        with RawH2Connection(d.address) as conn:
            ids = [conn.open_call(SIGN, headers=(("grpc-timeout", "200m"),)) for _ in range(3)]
            assert conn.wait_ended(ids, timeout=20), f"streams still open: {ids} vs {conn.ended}"
        with grpc.insecure_channel(d.address) as channel:
            assert sign_status(channel, timeout=15) == (grpc.StatusCode.OK, "")
    finally:
        assert d.stop() == 0
    log = d.log()
    assert "3 gone before their request was read" in log, log[-1500:]
    assert "status=DEADLINE_EXCEEDED" not in log
