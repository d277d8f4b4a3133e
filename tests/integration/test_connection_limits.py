"""Bounded resources per connection: request sizes per method, idle connections closed,
connections over the per-process limit refused."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import pytest

from hsmsign.names import ANSWERED_BY
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness import Daemon, TokenDir, hsmsignd, start_daemon, write_config
from tests.harness.calls import sign_status
from tests.harness.h2raw import RawH2Connection

SHA256 = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256


def _daemon(token: TokenDir, tmp: Path, limits: str = "") -> Daemon:
    config = write_config(
        tmp / "hsmsignd.toml", token, extra=f"[server]\nprocesses = 1\n[server.limits]\n{limits}"
    )
    return start_daemon(config, tmp / "run")


def _code(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = e.value.code()
    return code


def test_oversize_requests_are_refused_and_the_daemon_keeps_serving(
    token: TokenDir, tmp_path: Path
) -> None:
    d = _daemon(token, tmp_path)
    try:
        # Large enough for the client to send (its own limit is 64 MiB).
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        with grpc.insecure_channel(d.address, options=options) as channel:
            stub = pb_grpc.SignerStub(channel)
            key = pb.KeyRef(name="demo")
            # A single-digest call carrying 200 KB: under the transport's bound (1 MiB) but
            # over what a call with one digest needs (64 KiB).
            huge_digest = pb.SignDigestRequest(key=key, algorithm=SHA256, digest=b"\0" * 200_000)
            with pytest.raises(grpc.RpcError) as refused:
                stub.SignDigest(huge_digest, timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # The daemon marks its answers, so the client can tell them from its transport's.
            trailing: list[tuple[str, object]] = [
                (m.key, m.value) for m in refused.value.trailing_metadata()
            ]
            assert ANSWERED_BY in trailing
            # A batch over the transport's bound: refused by gRPC before it is read.
            huge_batch = pb.SignDigestsRequest(
                key=key, algorithm=SHA256, digests=[b"\0" * 32] * 40_000
            )
            code = _code(lambda: stub.SignDigests(huge_batch, timeout=30))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # A full batch of the largest digests still fits.
            digests = [hashlib.sha512(i.to_bytes(4, "big")).digest() for i in range(10_000)]
            full = pb.SignDigestsRequest(
                key=key, algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512, digests=digests
            )
            assert full.ByteSize() > 64 * 1024
            code = _code(lambda: stub.SignDigests(full, timeout=0.001))
            assert code != grpc.StatusCode.RESOURCE_EXHAUSTED
            ok = pb.SignDigestRequest(key=key, algorithm=SHA256, digest=b"\1" * 32)
            assert len(stub.SignDigest(ok, timeout=30).signature) == 256
    finally:
        assert d.stop() == 0
    assert "SignDigest peer=" in d.log() and "status=RESOURCE_EXHAUSTED" in d.log()


def test_idle_connection_is_closed(token: TokenDir, tmp_path: Path) -> None:
    d = _daemon(token, tmp_path, "max_connection_idle_seconds = 1.0")
    states: list[grpc.ChannelConnectivity] = []
    changed = threading.Condition()

    def record(state: grpc.ChannelConnectivity) -> None:
        with changed:
            states.append(state)
            changed.notify_all()

    try:
        with grpc.insecure_channel(d.address) as channel:
            stub = pb_grpc.SignerStub(channel)
            stub.GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")), timeout=30)
            channel.subscribe(record, try_to_connect=False)
            with changed:
                # READY now; the daemon's GOAWAY after 1 s of idleness makes the channel IDLE.
                closed = changed.wait_for(
                    lambda: grpc.ChannelConnectivity.IDLE in states, timeout=15
                )
            assert closed, f"connection still open after 15 s; states seen: {states}"
            # The next call simply reconnects.
            r = stub.GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")), timeout=30)
            assert r.key.name == "demo"
            channel.unsubscribe(record)
    finally:
        assert d.stop() == 0


def _framed_get_public_key() -> bytes:
    message = pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")).SerializeToString()
    return b"\0" + len(message).to_bytes(4, "big") + message


def test_an_old_connection_is_told_to_reconnect_even_while_busy(
    token: TokenDir, tmp_path: Path
) -> None:
    """max_connection_age on a live connection: GOAWAY once it is old although calls keep
    coming (so clients spread again after a restart), the calls sent before it answered, and
    the connection closed after the grace period."""
    d = _daemon(
        token,
        tmp_path,
        "max_connection_age_seconds = 2.0\nmax_connection_age_grace_seconds = 1.0\n",
    )
    try:
        with RawH2Connection(d.address) as conn:
            t0 = time.monotonic()
            streams: list[int] = []
            while not conn.goaway.is_set() and time.monotonic() - t0 < 15:
                streams.append(
                    conn.open_call(
                        "/hsmsign.v1.Signer/GetPublicKey", _framed_get_public_key(), True
                    )
                )
                time.sleep(0.2)
            took = time.monotonic() - t0
            assert conn.goaway.is_set(), "no GOAWAY within 15 s of a 2 s maximum age"
            assert took >= 1.5, f"GOAWAY after {took:.1f}s, before the age (2 s, +-10% jitter)"
            assert conn.wait_ended(streams, 10)  # every call sent was answered or refused
            assert conn.closed.wait(10), "still open 10 s after GOAWAY and a 1 s grace"
        with grpc.insecure_channel(d.address) as channel:  # a new connection is served
            assert sign_status(channel) == (grpc.StatusCode.OK, "")
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("answering", [True, False])
def test_keepalive_pings_an_idle_peer_and_closes_a_silent_one(
    token: TokenDir, tmp_path: Path, answering: bool
) -> None:
    """keepalive on a live connection with no calls: the daemon pings after
    keepalive_seconds; a peer that answers keeps its connection, one that never answers (a
    vanished client) loses it after keepalive_timeout_seconds, freeing its descriptor."""
    d = _daemon(token, tmp_path, "keepalive_seconds = 1.0\nkeepalive_timeout_seconds = 1.0\n")
    try:
        with RawH2Connection(d.address, answer_pings=answering) as conn:
            closed = conn.closed.wait(6)
            assert conn.pings >= 1, f"no keepalive PING in 6 s (answering={answering})"
            if answering:
                assert not closed, "a peer that answers every PING lost its connection"
            else:
                assert closed, "a peer that never answers a PING still has its connection"
    finally:
        assert d.stop() == 0


def test_limits_config_errors_are_one_line(token: TokenDir, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "bad.toml",
        token,
        extra="[server.limits]\nmax_request_bytes = 1000\nmax_small_request_bytes = 2000",
    )
    r = hsmsignd(config, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"hsmsignd: config error: {config}: server.limits.max_small_request_bytes: got 2000; "
        "allowed: at most max_request_bytes (1000)"
    ]


def test_connections_over_the_limit_are_closed_and_the_daemon_keeps_serving(
    token: TokenDir, tmp_path: Path
) -> None:
    d = _daemon(token, tmp_path, "max_connections = 3")
    held: list[RawH2Connection] = []
    try:
        for _ in range(3):
            held.append(RawH2Connection(d.address))
        # Accepted: answered with the server's SETTINGS, and still open a moment later.
        extra = RawH2Connection(d.address)
        held.append(extra)
        assert extra.closed.wait(15), "a connection over max_connections was kept open"
        assert not any(c.closed.is_set() for c in held[:3])
        for c in held:
            c.close()
        # Closed connections give their places back (gRPC counts them down as they close).
        deadline = time.monotonic() + 30
        while True:
            with grpc.insecure_channel(d.address) as channel:
                status = sign_status(channel, timeout=5)
            if status == (grpc.StatusCode.OK, "") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == (grpc.StatusCode.OK, "")
    finally:
        for c in held:
            c.close()
        assert d.stop() == 0
