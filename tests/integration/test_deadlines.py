"""Calls whose caller has gone are not run: an expired or cancelled call never signs, and a
batch stops between digests once its caller's deadline has passed or it was cancelled.

The evidence is what an operator sees: the access-log status of the call, and the line each
serving process writes when it stops, which counts the signatures it made."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness import Daemon, TokenDir, start_daemon, write_config

SHA256 = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256
BATCH = 10_000


def _digests(n: int) -> list[bytes]:
    return [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n)]


def _one_process_daemon(token: TokenDir, tmp: Path) -> Daemon:
    config = write_config(tmp / "hsmsignd.toml", token, extra="[server]\nprocesses = 1")
    return start_daemon(config, tmp / "run")


def _stop_and_count(d: Daemon) -> tuple[str, int]:
    """Stops the daemon; returns its log and the signatures it says it made."""
    assert d.stop() == 0
    log = d.log()
    made = re.findall(r"(\d+) signatures made", log)
    assert made, f"no signature count when stopping:\n{log}"
    return log, sum(int(n) for n in made)


def _access_status(log: str, method: str) -> list[str]:
    return re.findall(rf"hsmsign\.access: {method} peer=\S+ status=(\w+)", log)


def test_batch_stops_when_its_deadline_passes(token: TokenDir, tmp_path: Path) -> None:
    d = _one_process_daemon(token, tmp_path)
    try:
        with grpc.insecure_channel(d.address) as channel:
            stub = pb_grpc.SignerStub(channel)
            req = pb.SignDigestsRequest(
                key=pb.KeyRef(name="demo"), algorithm=SHA256, digests=_digests(BATCH)
            )
            # 10,000 signatures take several seconds; the caller gives up after 2.
            with pytest.raises(grpc.RpcError) as e:
                stub.SignDigests(req, timeout=2.0)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        log, made = _stop_and_count(d)
    # Stopped part-way (or, on a machine so loaded that the request was not read within the
    # deadline, never started): never completed and logged as OK.
    assert set(_access_status(log, "SignDigests")) <= {"DEADLINE_EXCEEDED"}
    assert made < BATCH


def test_cancelled_batch_stops(token: TokenDir, tmp_path: Path) -> None:
    d = _one_process_daemon(token, tmp_path)
    try:
        with grpc.insecure_channel(d.address) as channel:
            stub = pb_grpc.SignerStub(channel)
            req = pb.SignDigestsRequest(
                key=pb.KeyRef(name="demo"), algorithm=SHA256, digests=_digests(BATCH)
            )
            call = stub.SignDigests.future(req, timeout=60)
            time.sleep(1.0)
            assert call.cancel()
    finally:
        log, made = _stop_and_count(d)
    assert set(_access_status(log, "SignDigests")) <= {"CANCELLED"}
    assert made < BATCH


def test_call_expired_on_arrival_is_not_run(token: TokenDir, tmp_path: Path) -> None:
    # A 1 microsecond deadline has passed by the time the request is read; gRPC still hands
    # such a call to the handler when a serving thread is free.
    d = _one_process_daemon(token, tmp_path)
    calls = 5
    try:
        with grpc.insecure_channel(d.address) as channel:
            stub = pb_grpc.SignerStub(channel)
            stub.GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")))  # connected
            req = pb.SignDigestsRequest(
                key=pb.KeyRef(name="demo"), algorithm=SHA256, digests=_digests(100)
            )
            for _ in range(calls):
                with pytest.raises(grpc.RpcError) as e:
                    stub.SignDigests(req, timeout=1e-6)
                assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        log, made = _stop_and_count(d)
    assert "OK" not in _access_status(log, "SignDigests")
    assert made == 0


def test_batch_within_its_deadline_signs_every_digest(token: TokenDir, tmp_path: Path) -> None:
    d = _one_process_daemon(token, tmp_path)
    n = 200
    try:
        with grpc.insecure_channel(d.address) as channel:
            stub = pb_grpc.SignerStub(channel)
            spki = stub.GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")))
            digests = _digests(n)
            req = pb.SignDigestsRequest(
                key=pb.KeyRef(name="demo"), algorithm=SHA256, digests=digests
            )
            sigs = stub.SignDigests(req, timeout=120).signatures
    finally:
        log, made = _stop_and_count(d)
    pub = serialization.load_der_public_key(spki.spki_der)
    assert isinstance(pub, rsa.RSAPublicKey)
    assert len(sigs) == n
    for digest, sig in zip(digests, sigs, strict=True):
        pub.verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    assert _access_status(log, "SignDigests") == ["OK"]
    assert made == n
