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
from hsmsign.connection import MAX_CONNECTIONS, channel_target
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


class _Peers:
    """Answers SignDigest with an empty signature and records the connection (peer) of each
    call."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def sign_digest(
        self, request: pb.SignDigestRequest, context: grpc.ServicerContext
    ) -> pb.SignDigestResponse:
        self.seen.append(context.peer())
        return pb.SignDigestResponse()

    def add_to(self, server: grpc.Server) -> None:
        sign_digest = grpc.unary_unary_rpc_method_handler(
            self.sign_digest,
            request_deserializer=pb.SignDigestRequest.FromString,
            response_serializer=pb.SignDigestResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "hsmsign.v1.Signer", {"SignDigest": sign_digest}
                ),
            )
        )


@pytest.fixture()
def peers_server() -> Iterator[tuple[str, _Peers]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    peers = _Peers()
    peers.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", peers
    server.stop(None).wait()


@pytest.mark.parametrize("connections", [1, 3])
def test_calls_take_the_connections_in_turn(
    peers_server: tuple[str, _Peers], connections: int
) -> None:
    address, peers = peers_server
    with Client(address, timeout=10, connections=connections) as c:
        for _ in range(2 * connections):
            c.sign_digest("demo", b"\0" * 32)
    # One call after another: each channel (its own TCP connection) got two of them.
    assert len(set(peers.seen)) == connections
    assert all(peers.seen.count(p) == 2 for p in peers.seen)


def test_clients_of_several_connections_do_not_share_them(
    peers_server: tuple[str, _Peers],
) -> None:
    address, peers = peers_server
    with Client(address, timeout=10, connections=2) as a, Client(address, connections=2) as b:
        for c in (a, b, a, b):
            c.sign_digest("demo", b"\0" * 32)
    assert len(set(peers.seen)) == 4


def test_clients_of_one_connection_share_it_by_default(peers_server: tuple[str, _Peers]) -> None:
    address, peers = peers_server
    with Client(address, timeout=10) as a, Client(address, timeout=10) as b:
        assert a.connections == 1
        a.sign_digest("demo", b"\0" * 32)
        b.sign_digest("demo", b"\0" * 32)
    assert len(set(peers.seen)) == 1


def test_connections_from_the_environment(
    peers_server: tuple[str, _Peers], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, peers = peers_server
    monkeypatch.setenv("HSMSIGN_CONNECTIONS", "2")
    with Client(address, timeout=10) as c:
        assert c.connections == 2
        for _ in range(4):
            c.sign_digest("demo", b"\0" * 32)
    assert len(set(peers.seen)) == 2
    monkeypatch.setenv("HSMSIGN_CONNECTIONS", "two")
    with pytest.raises(UsageError) as e:
        Client(address)
    assert str(e.value).startswith("HSMSIGN_CONNECTIONS 'two': ")


@pytest.mark.parametrize("bad", [0, -1, MAX_CONNECTIONS + 1, True])
def test_bad_connections(bad: int) -> None:
    with pytest.raises(UsageError) as e:
        Client("127.0.0.1:1", connections=bad)
    assert f"a whole number from 1 to {MAX_CONNECTIONS}" in str(e.value)
