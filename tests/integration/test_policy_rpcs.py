"""Every RPC of Signer and KeyAdmin against a real daemon whose policy grants the caller
some keys: granted calls pass the policy, the others are PERMISSION_DENIED naming the
operation and the key as written, identically for a key that exists and one that does not;
and the per-identity limits answer RESOURCE_EXHAUSTED with a retry hint."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.protobuf.duration_pb2 import Duration

from hsmsign.admin import KeyAdmin, wrapped_import_request
from hsmsign.client import Client
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.conftest import Daemon, TokenDir, hsmsignd, make_token, start_daemon, write_config

DENIED = grpc.StatusCode.PERMISSION_DENIED
OK = grpc.StatusCode.OK

POLICY = """
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local"]
keys = ["granted"]
operations = ["get_public_key", "sign_digest", "seal_session_key", "sign_checksum",
              "rotate", "set_primary", "disable", "enable", "schedule_destroy",
              "cancel_destroy", "get", "list"]
[[policy.grant]]
identities = ["local"]
keys = ["wrap-src"]
operations = ["unwrap", "get_public_key"]
[[policy.grant]]
identities = ["local"]
keys = ["wrap-dst"]
operations = ["rewrap"]
[[policy.grant]]
identities = ["local"]
keys = ["new-*"]
operations = ["create", "import"]
"""


@pytest.fixture(scope="module")
def policy_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("policy")
    token: TokenDir = make_token(tmp / "token", "hsmsign-policy")
    admin_cfg = write_config(tmp / "admin.toml", token)  # the test's own: grants everything
    for name, purpose in (
        ("granted", "sign"),
        ("other", "sign"),
        ("wrap-src", "unwrap"),
        ("wrap-dst", "unwrap"),
        ("wrap-hidden", "unwrap"),
    ):
        hsmsignd(admin_cfg, "keys", "create", name, "--purpose", purpose)
    cfg = write_config(
        tmp / "c.toml",
        token,
        policy=POLICY,
        # One serving process: limits are per process, and one token login is quicker. The
        # plaintext ImportKey is allowed, which loopback must still refuse.
        extra="[server]\nprocesses = 1\nallow_plaintext_import = true\n"
        "[keyring]\nmin_destruction_delay_hours = 0\n"
        "dev_unsafe_allow_short_destruction_delay = true\n",
    )
    d = start_daemon(cfg, tmp / "d")
    yield d
    d.stop()


def _call(d: Daemon, service: str, method: str, request: Any) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(d.address) as ch:
        stub: Any = (pb_grpc.SignerStub if service == "Signer" else pb_grpc.KeyAdminStub)(ch)
        try:
            getattr(stub, method)(request, timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    return OK, ""


def _ref(name: str) -> pb.KeyRef:
    return pb.KeyRef(name=name)


def _wrapped(d: Daemon, name: str) -> bytes:
    _, der = _public_key(d, name)
    pub = serialization.load_der_public_key(der)
    assert isinstance(pub, rsa.RSAPublicKey)
    # OAEP with SHA-1: what SoftHSM2 2.6.1 can unwrap.
    oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)  # noqa: S303
    return pub.encrypt(b"\x07" * 16, oaep)


def _public_key(d: Daemon, name: str) -> tuple[str, bytes]:
    with grpc.insecure_channel(d.address) as ch:
        r = pb_grpc.SignerStub(ch).GetPublicKey(pb.GetPublicKeyRequest(key=_ref(name)), timeout=30)
    return r.key.fingerprint, r.spki_der


SHA = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256
V3 = pb.CHECKSUM_FORMAT_V3
OAEP = pb.UNWRAP_SCHEME_RSA_OAEP_SHA1

#: (service, method, operation, request for a key name) for every RPC naming one key.
ONE_KEY: list[tuple[str, str, str, Callable[[str], Any]]] = [
    ("Signer", "GetPublicKey", "get_public_key", lambda k: pb.GetPublicKeyRequest(key=_ref(k))),
    (
        "Signer",
        "SignDigest",
        "sign_digest",
        lambda k: pb.SignDigestRequest(key=_ref(k), digest=b"\x01" * 32, algorithm=SHA),
    ),
    (
        "Signer",
        "SignDigests",
        "sign_digest",
        lambda k: pb.SignDigestsRequest(key=_ref(k), digests=[b"\x01" * 32], algorithm=SHA),
    ),
    (
        "Signer",
        "SealSessionKey",
        "seal_session_key",
        lambda k: pb.SealSessionKeyRequest(key=_ref(k), session_key=b"\x02" * 16),
    ),
    (
        "Signer",
        "SignChecksum",
        "sign_checksum",
        lambda k: pb.SignChecksumRequest(key=_ref(k), checksum_sha256=b"\x03" * 32, format=V3),
    ),
    (
        "Signer",
        "SealBundle",
        "seal_session_key",
        lambda k: pb.SealBundleRequest(
            key=_ref(k),
            session_key=b"\x02" * 16,
            iv=b"\x04" * 16,
            checksum_sha256=b"\x03" * 32,
            format=V3,
        ),
    ),
    (
        "Signer",
        "SignChecksums",
        "sign_checksum",
        lambda k: pb.SignChecksumsRequest(key=_ref(k), checksums_sha256=[b"\x03" * 32], format=V3),
    ),
    ("KeyAdmin", "GetKey", "get", lambda k: pb.GetKeyRequest(name=k)),
    ("KeyAdmin", "RotateKey", "rotate", lambda k: pb.RotateKeyRequest(name=k)),
    (
        "KeyAdmin",
        "SetPrimaryVersion",
        "set_primary",
        lambda k: pb.KeyVersionRequest(name=k, version=1),
    ),
    (
        "KeyAdmin",
        "DisableKeyVersion",
        "disable",
        lambda k: pb.KeyVersionRequest(name=k, version=2),
    ),
    ("KeyAdmin", "EnableKeyVersion", "enable", lambda k: pb.KeyVersionRequest(name=k, version=2)),
    (
        "KeyAdmin",
        "ScheduleKeyVersionDestruction",
        "schedule_destroy",
        lambda k: pb.ScheduleDestructionRequest(name=k, version=2, delay=Duration(seconds=3600)),
    ),
    (
        "KeyAdmin",
        "CancelKeyVersionDestruction",
        "cancel_destroy",
        lambda k: pb.KeyVersionRequest(name=k, version=2),
    ),
]


def test_every_one_key_rpc_is_granted_on_its_key_only(policy_daemon: Daemon) -> None:
    """In order: each RPC passes on "granted" (OK, as the calls build on each other), and is
    PERMISSION_DENIED on "other" (exists) and on "missing" (does not), with one message."""
    for service, method, op, request in ONE_KEY:
        code, details = _call(policy_daemon, service, method, request("granted"))
        assert code == OK, (method, code, details)
        denied = {}
        for key in ("other", "missing"):
            code, details = _call(policy_daemon, service, method, request(key))
            assert code == DENIED, (method, key, code, details)
            assert f"may not {op} key '{key}'" in details, (method, details)
            assert "hsmsign-policy" not in details
            denied[key] = details.replace(f"'{key}'", "KEY")
        assert denied["other"] == denied["missing"], method


def test_seal_bundle_needs_both_capgo_rights(tmp_path: Path, policy_daemon: Daemon) -> None:
    from server.policy.gate import RPCS
    from server.policy.model import Operation

    assert {c.operation for c in RPCS["SealBundle"]} == {
        Operation.SEAL_SESSION_KEY,
        Operation.SIGN_CHECKSUM,
    }


def test_references_by_fingerprint_do_not_reveal_keys(policy_daemon: Daemon) -> None:
    granted_fp, _ = _public_key(policy_daemon, "granted")
    hidden_fp = ""
    for key, fp, expected in (
        ("granted", granted_fp, OK),
        ("missing", "ab" * 32, DENIED),
    ):
        request = pb.SignDigestRequest(
            key=pb.KeyRef(fingerprint=fp), digest=b"\x01" * 32, algorithm=SHA
        )
        code, details = _call(policy_daemon, "Signer", "SignDigest", request)
        assert code == expected, (key, code, details)
        hidden_fp = details
    assert "may not sign_digest key fingerprint" in hidden_fp


def test_unwrap_and_rewrap(policy_daemon: Daemon) -> None:
    wrapped = _wrapped(policy_daemon, "wrap-src")

    def unwrap(key: str) -> tuple[grpc.StatusCode, str]:
        request = pb.UnwrapSessionKeyRequest(key=_ref(key), wrapped_key=wrapped, scheme=OAEP)
        return _call(policy_daemon, "Signer", "UnwrapSessionKey", request)

    def rewrap(src: str, dst: str) -> tuple[grpc.StatusCode, str]:
        request = pb.RewrapSessionKeyRequest(
            from_key=_ref(src),
            wrapped_key=wrapped,
            from_scheme=OAEP,
            to_key=_ref(dst),
            to_scheme=OAEP,
        )
        return _call(policy_daemon, "Signer", "RewrapSessionKey", request)

    assert unwrap("wrap-src") == (OK, "")
    for key in ("wrap-dst", "wrap-hidden", "missing"):
        code, details = unwrap(key)
        assert code == DENIED and f"may not unwrap key '{key}'" in details
    assert rewrap("wrap-src", "wrap-dst") == (OK, "")
    # The attack: rewrap to a key the caller chose (it holds no right to wrap to).
    code, details = rewrap("wrap-src", "wrap-hidden")
    assert code == DENIED and "may not rewrap key 'wrap-hidden'" in details
    code, details = rewrap("wrap-dst", "wrap-dst")
    assert code == DENIED and "may not unwrap key 'wrap-dst'" in details


def test_create_import_and_list(policy_daemon: Daemon) -> None:
    create = pb.CreateKeyRequest(
        name="new-sign", purpose=pb.KEY_PURPOSE_SIGN, algorithm=pb.KEY_ALGORITHM_RSA_2048
    )
    assert _call(policy_daemon, "KeyAdmin", "CreateKey", create)[0] == OK
    create.name = "sneaky"
    code, details = _call(policy_daemon, "KeyAdmin", "CreateKey", create)
    assert code == DENIED and "may not create key 'sneaky'" in details
    der = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    plain = pb.ImportKeyRequest(
        name="new-imported", purpose=pb.KEY_PURPOSE_SIGN, private_key_der=der
    )
    # In clear over loopback TCP: refused even with server.allow_plaintext_import (the
    # ceremony is for the admin socket, where the socket's mode decides who connects).
    code, details = _call(policy_daemon, "KeyAdmin", "ImportKey", plain)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "admin socket" in details, details
    with Client(policy_daemon.address) as c:
        to = KeyAdmin(c).import_wrapping_key()
    imp = wrapped_import_request(plain, to)
    assert _call(policy_daemon, "KeyAdmin", "ImportKey", imp) == (OK, "")
    # Making an imported version primary needs set_primary too.
    imp.make_primary = True
    code, details = _call(policy_daemon, "KeyAdmin", "ImportKey", imp)
    assert code == DENIED and "may not set_primary key 'new-imported'" in details
    imp.name = "granted"
    code, details = _call(policy_daemon, "KeyAdmin", "ImportKey", imp)
    assert code == DENIED and "may not import key 'granted'" in details
    with grpc.insecure_channel(policy_daemon.address) as ch:
        listed = pb_grpc.KeyAdminStub(ch).ListKeys(pb.ListKeysRequest(), timeout=30)
    assert [k.name for k in listed.keys] == ["granted"]


def test_import_wrapping_key_needs_import_on_some_key(
    token: TokenDir, tmp_path: Path, policy_daemon: Daemon
) -> None:
    """GetImportWrappingKey names no key: a caller that may import some key gets it, one
    that may import none is PERMISSION_DENIED."""
    request = pb.GetImportWrappingKeyRequest()
    assert _call(policy_daemon, "KeyAdmin", "GetImportWrappingKey", request) == (OK, "")
    no_import = """
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local"]
keys = ["*"]
operations = ["create", "get", "list"]
"""
    cfg = write_config(
        tmp_path / "c.toml", token, policy=no_import, extra="[server]\nprocesses = 1\n"
    )
    d = start_daemon(cfg, tmp_path / "d")
    try:
        code, details = _call(d, "KeyAdmin", "GetImportWrappingKey", request)
    finally:
        d.stop()
    assert code == DENIED and "may not import keys" in details, details


def test_per_identity_rate_limit(token: TokenDir, tmp_path: Path) -> None:
    policy = """
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local"]
keys = ["*"]
operations = ["get_public_key"]
[policy.limits.local]
rate = 1
burst = 2
"""
    cfg = write_config(tmp_path / "c.toml", token, policy=policy, extra="[server]\nprocesses = 1\n")
    d = start_daemon(cfg, tmp_path / "d")
    try:
        with grpc.insecure_channel(d.address) as ch:
            stub = pb_grpc.SignerStub(ch)
            request = pb.GetPublicKeyRequest(key=_ref("demo"))
            stub.GetPublicKey(request, timeout=30)
            stub.GetPublicKey(request, timeout=30)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as e:
                stub.GetPublicKey(request, timeout=30)
            assert time.monotonic() - t0 < 1.0  # refused at once, not queued
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            call = cast(grpc.Call, e.value)
            trailers = {k: str(v) for k, v in call.trailing_metadata() or ()}
            assert 0 < int(trailers["retry-after-ms"]) <= 1000
            assert "retry in" in (e.value.details() or "")
            time.sleep(int(trailers["retry-after-ms"]) / 1000 + 0.05)
            stub.GetPublicKey(request, timeout=30)
    finally:
        d.stop()


def test_a_reload_does_not_refill_a_spent_rate_limit(token: TokenDir, tmp_path: Path) -> None:
    policy = """
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local"]
keys = ["*"]
operations = ["get_public_key"]
[policy.limits.local]
rate = 0.01
burst = 2
"""
    cfg = write_config(tmp_path / "c.toml", token, policy=policy, extra="[server]\nprocesses = 1\n")
    d = start_daemon(cfg, tmp_path / "d")
    try:
        with grpc.insecure_channel(d.address) as ch:
            stub = pb_grpc.SignerStub(ch)
            request = pb.GetPublicKeyRequest(key=_ref("demo"))
            for _ in range(2):
                stub.GetPublicKey(request, timeout=30)
            d.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 30
            while "SIGHUP: config reloaded" not in d.log():
                assert time.monotonic() < deadline, d.log()
                time.sleep(0.1)
            with pytest.raises(grpc.RpcError) as e:
                stub.GetPublicKey(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    finally:
        d.stop()
