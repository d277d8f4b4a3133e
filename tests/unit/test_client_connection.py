"""The client's targets and its messages for failed calls, against real in-process gRPC
servers on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hsmsign.client import Client
from hsmsign.connection import channel_target
from hsmsign.errors import RemoteError, UsageError
from hsmsign.names import ANSWERED_BY
from hsmsign.v1 import hsmsign_pb2 as pb


@pytest.mark.parametrize(
    ("given", "target"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("signer.example:443", "signer.example:443"),
        ("dns:///signer.example:443", "dns:///signer.example:443"),
        ("127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
        ("10.0.0.1:1, 10.0.0.2:1", "ipv4:10.0.0.1:1,10.0.0.2:1"),
        ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
    ],
)
def test_targets(given: str, target: str) -> None:
    assert channel_target(given) == target


@pytest.mark.parametrize("given", ["a.example:1,b.example:1", "127.0.0.1:1,,127.0.0.1:2"])
def test_bad_target_lists(given: str) -> None:
    with pytest.raises(UsageError) as e:
        channel_target(given)
    assert "\n" not in str(e.value)


class _Draining:
    """Answers SignDigest like a daemon that received SIGTERM (test_connection_limits checks
    that the real daemon marks its answers)."""

    calls = 0

    @staticmethod
    def sign_digest(
        request: pb.SignDigestRequest, context: grpc.ServicerContext
    ) -> pb.SignDigestResponse:
        _Draining.calls += 1
        context.set_trailing_metadata((ANSWERED_BY,))
        context.abort(grpc.StatusCode.UNAVAILABLE, "hsmsignd is shutting down; retry")

    @staticmethod
    def add_to(server: grpc.Server) -> None:
        sign_digest = grpc.unary_unary_rpc_method_handler(
            _Draining.sign_digest,
            request_deserializer=pb.SignDigestRequest.FromString,
            response_serializer=pb.SignDigestResponse.SerializeToString,
        )
        signer = grpc.method_handlers_generic_handler(
            "hsmsign.v1.Signer", {"SignDigest": sign_digest}
        )
        server.add_generic_rpc_handlers((signer,))


@pytest.fixture()
def draining_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    _Draining.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    _Draining.calls = 0
    yield f"127.0.0.1:{port}"
    server.stop(None).wait()


def test_daemon_shutting_down_is_not_cannot_reach(draining_server: str) -> None:
    with Client(draining_server, timeout=30) as c, pytest.raises(RemoteError) as e:
        c.sign_digest("demo", b"\0" * 32)
    assert str(e.value) == "UNAVAILABLE: hsmsignd is shutting down; retry"
    assert _Draining.calls > 1  # the retry policy tried again before giving up


def test_no_daemon_is_cannot_reach_without_tls_hint() -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=5) as c, pytest.raises(RemoteError) as e:
        c.sign_digest("demo", b"\0" * 32)
    assert e.value.status_name == "UNAVAILABLE"
    assert e.value.message.startswith("cannot reach hsmsignd: ")
    assert "--tls-ca" not in e.value.message


def test_daemon_not_serving_its_health_is_not_cannot_reach() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    _Draining.add_to(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set("hsmsign.v1.Signer", health_pb2.HealthCheckResponse.NOT_SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as c, pytest.raises(RemoteError) as e:
            c.sign_digest("demo", b"\0" * 32)
    finally:
        server.stop(None).wait()
    assert e.value.status_name == "UNAVAILABLE"
    assert e.value.message.startswith("hsmsignd is not serving (shutting down or starting)")
    assert "--tls-ca" not in e.value.message
