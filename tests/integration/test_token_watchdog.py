"""Every token call runs under a time limit (server/pkcs11/watchdog.py, issue 16): a call that
hangs past it fails with UNAVAILABLE, its session is not used again and health says
NOT_SERVING until the token answers; a call that stays hung ends the process with code 75.
The hang comes from a test-only launcher (tests/harness/hanging_token.py) over the real
SoftHSM2 token."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_der_public_key
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server.errors import EXIT_TOKEN_HUNG
from tests.harness import hanging_token
from tests.harness.tokens import TokenDir, token_with_keys, write_config

DIGEST = hashlib.sha256(b"hsmsign watchdog").digest()


@pytest.fixture(scope="module")
def wd_token(tmp_path_factory: pytest.TempPathFactory) -> TokenDir:
    t, _ = token_with_keys(tmp_path_factory.mktemp("wd"), ["demo"], label="hsmsign-watchdog")
    return t


def _sign(address: str, timeout: float = 60) -> bytes:
    """One SignDigest on a plain channel (no retries: the test sees the daemon's status)."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        resp: pb.SignDigestResponse = pb_grpc.SignerStub(ch).SignDigest(
            pb.SignDigestRequest(
                key=pb.KeyRef(name="demo"),
                algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
                digest=DIGEST,
            ),
            timeout=timeout,
        )
        return resp.signature


def _health(address: str) -> int:
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="hsmsign.v1.Signer"), timeout=10
        )
        return int(r.status)


def _public_key(address: str) -> rsa.RSAPublicKey:
    with grpc.insecure_channel(address) as ch:
        der = pb_grpc.SignerStub(ch).GetPublicKey(
            pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")), timeout=30
        )
    pub = load_der_public_key(der.spki_der)
    assert isinstance(pub, rsa.RSAPublicKey)
    return pub


def test_a_call_past_its_limit_fails_unavailable_and_health_follows(
    wd_token: TokenDir, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        wd_token,
        extra="[server]\nprocesses = 1\n",
        extra_token="call_timeout_seconds = 1\nstuck_exit_seconds = 30\n",
    )
    hang_file = tmp_path / "hang"
    d = hanging_token.start(cfg, tmp_path / "d", hang_file)
    try:
        pub = _public_key(d.address)
        _sign(d.address)
        assert _health(d.address) == health_pb2.HealthCheckResponse.SERVING
        hanging_token.hang(hang_file, 4)
        outcome: list[BaseException | bytes] = []
        caller = threading.Thread(target=lambda: outcome.append(_catch(d.address)))
        caller.start()
        time.sleep(0.5)
        hang_file.unlink()  # only the call already in the token hangs
        # Past the 1 s limit while the call still hangs: NOT_SERVING.
        deadline = time.monotonic() + 3
        while _health(d.address) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health stayed SERVING during a hung call"
            time.sleep(0.1)
        caller.join(30)
        (result,) = outcome
        assert isinstance(result, grpc.RpcError), "a call past its limit answered OK"
        assert result.code() == grpc.StatusCode.UNAVAILABLE
        assert "past its limit of 1s (token.call_timeout_seconds)" in (result.details() or "")
        # The token answers again: SERVING, and signatures from the pool's sessions verify.
        assert _health(d.address) == health_pb2.HealthCheckResponse.SERVING
        for _ in range(12):
            sig = _sign(d.address)
            pub.verify(sig, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    finally:
        d.stop()
    log = d.log()
    assert "token call hung: signing with" in log and "the token answered again" in log
    assert "Traceback" not in log


def _catch(address: str) -> BaseException | bytes:
    try:
        return _sign(address)
    except grpc.RpcError as e:
        return e


def test_a_call_that_stays_hung_ends_the_process_with_75(
    wd_token: TokenDir, tmp_path: Path
) -> None:
    """With the default limits (10 s, then 10 s more) a call stuck in the token ends the
    process about 20 s after it started; its caller gets UNAVAILABLE, not a hang."""
    cfg = write_config(tmp_path / "c.toml", wd_token, extra="[server]\nprocesses = 1\n")
    hang_file = tmp_path / "hang"
    d = hanging_token.start(cfg, tmp_path / "d", hang_file)
    try:
        _sign(d.address)
        hanging_token.hang(hang_file, 3600)
        started = time.monotonic()
        result = _catch(d.address)
        try:
            code = d.proc.wait(timeout=30)
        except Exception:
            raise AssertionError(f"still running 30 s after the hang:\n{d.log()}") from None
        took = time.monotonic() - started
    finally:
        d.stop()
    print(f"exited {took:.1f} s after the call started")
    assert code == EXIT_TOKEN_HUNG, d.log()
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.UNAVAILABLE
    assert "exiting with code 75" in d.log()
