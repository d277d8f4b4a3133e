"""Injected token faults reach every serving process of a daemon (issue 16).

The fault-injection launcher (tests/harness/faulty_hsmsignd.py) has the supervisor start each
serving process through it too, with the same plan; before, only a daemon of one process
could be tested with injected faults. Here the issue's first row, in both processes at once:
SoftHSM2 after one failed read finds nothing and calls every cached handle invalid until the
module is re-initialised. Each process must find it, recover by itself, and answer only OK or
UNAVAILABLE meanwhile (never NOT_FOUND), whichever process a connection lands on.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness.daemons import start_daemon
from tests.harness.faults import fired, launcher, write_plan
from tests.harness.tokens import token_with_keys

RECOVERY_BOUND = 30.0
DIGEST = hashlib.sha256(b"every serving process").digest()
_REINIT = re.compile(r"\[(\d)/2\] server\.pkcs11\.token: token label '[^']+' fault: ")


def _sign_on_new_connection(address: str) -> tuple[grpc.StatusCode, bytes]:
    """One call on a connection of its own (the kernel picks the serving process)."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        try:
            resp = pb_grpc.SignerStub(ch).SignDigest(
                pb.SignDigestRequest(
                    key=pb.KeyRef(name="demo"),
                    digest=DIGEST,
                    algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
                ),
                timeout=30,
            )
        except grpc.RpcError as e:
            return e.code(), b""
    return grpc.StatusCode.OK, resp.signature


def _public_key(address: str) -> rsa.RSAPublicKey:
    with grpc.insecure_channel(address) as ch:
        resp = pb_grpc.SignerStub(ch).GetPublicKey(
            pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")), timeout=30
        )
    key = serialization.load_der_public_key(resp.spki_der)
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def test_a_ring_that_stops_reading_in_every_process_is_recovered_by_each(tmp_path: Path) -> None:
    _token, config = token_with_keys(
        tmp_path / "t",
        ["demo"],
        label="hsmsign-faults-2",
        extra="[server]\nprocesses = 2\n[keyring]\nrefresh_seconds = 0.5\n",
    )
    plan = tmp_path / "plan.json"
    write_plan(plan)
    d = start_daemon(config, tmp_path / "d", command=launcher(plan))
    try:
        pub = _public_key(d.address)
        assert all(_sign_on_new_connection(d.address)[0] is grpc.StatusCode.OK for _ in range(8))
        write_plan(
            plan,
            {"call": "find_objects", "result": "empty", "until": "initialize"},
            {"call": "sign", "error": "ObjectHandleInvalid", "until": "initialize"},
        )
        seen: list[grpc.StatusCode] = []
        recovered: set[str] = set()
        deadline = time.monotonic() + RECOVERY_BOUND
        while time.monotonic() < deadline:
            code, signature = _sign_on_new_connection(d.address)
            seen.append(code)
            if code is grpc.StatusCode.OK:
                pub.verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
            recovered = set(_REINIT.findall(d.log()))
            if recovered == {"1", "2"} and seen[-8:] == [grpc.StatusCode.OK] * 8:
                break
            time.sleep(0.05)
        write_plan(plan)
    finally:
        d.stop()
    assert fired(plan), "no fault fired: the test proves nothing"
    assert recovered == {"1", "2"}, f"serving processes that found the fault: {sorted(recovered)}"
    wrong = sorted({c.name for c in seen} - {"OK", "UNAVAILABLE"})
    assert not wrong, f"answers other than OK and UNAVAILABLE during the fault: {wrong}"
    assert seen[-8:] == [grpc.StatusCode.OK] * 8, (
        f"not signing again on every connection: {seen[-8:]}"
    )
