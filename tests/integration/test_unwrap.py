"""UnwrapSessionKey and RewrapSessionKey through a real daemon on a SoftHSM2 token of their own.

Keys: 'vault' and 'vault2' (unwrap, OAEP only), 'legacy' (unwrap, PKCS#1 v1.5 enabled in the
config), 'signer' (sign). Ciphertexts are made with cryptography from the public keys.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hsmsign.client import Client
from hsmsign.errors import RemoteError
from hsmsign.unwrap_client import rewrap_session_key, unwrap_session_key
from tests.conftest import Daemon
from tests.harness import leaks
from tests.harness.daemons import running_daemon
from tests.harness.tokens import KeySpec, token_with_keys

# OAEP with SHA-1 is what SoftHSM2 2.6.1 can do (no collision resistance is needed in OAEP).
OAEP_SHA1 = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)  # noqa: S303
OAEP_SHA256 = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)


@pytest.fixture(scope="module")
def unwrap_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    _token, config = token_with_keys(
        tmp_path_factory.mktemp("unwrap-token"),
        [*(KeySpec(name, "unwrap") for name in ("vault", "vault2", "legacy")), "signer"],
        label="hsmsign-unwrap",
        extra="[keys.legacy]\nallow_pkcs1v15_unwrap = true\n",
    )
    with running_daemon(config, tmp_path_factory.mktemp("unwrap-daemon")) as d:
        yield d


@pytest.fixture()
def uc(unwrap_daemon: Daemon) -> Iterator[Client]:
    c = Client(unwrap_daemon.address)
    yield c
    c.close()


def public_key(c: Client, name: str) -> rsa.RSAPublicKey:
    pk = serialization.load_der_public_key(c.public_key(name).spki_der)
    assert isinstance(pk, rsa.RSAPublicKey)
    return pk


def status(excinfo: pytest.ExceptionInfo[RemoteError]) -> tuple[str, str]:
    return excinfo.value.status_name, excinfo.value.message


@pytest.mark.parametrize("length", [16, 24, 32])
def test_oaep_sha1_round_trip(uc: Client, length: int) -> None:
    session_key = os.urandom(length)
    leaks.remember(session_key, f"an unwrapped session key ({length} bytes)")
    wrapped = public_key(uc, "vault").encrypt(session_key, OAEP_SHA1)
    u = unwrap_session_key(uc, "vault", wrapped, "rsa-oaep-sha1")
    assert u.session_key == session_key
    assert (u.key.name, u.key.version) == ("vault", 1)
    assert session_key.hex() not in repr(u)


def test_pkcs1v15_round_trip_when_enabled(uc: Client) -> None:
    session_key = os.urandom(16)
    wrapped = public_key(uc, "legacy").encrypt(session_key, padding.PKCS1v15())
    assert unwrap_session_key(uc, "legacy", wrapped, "rsa-pkcs1v15").session_key == session_key


def test_oaep_sha256_on_softhsm_is_a_clear_failed_precondition(uc: Client) -> None:
    session_key = os.urandom(16)
    wrapped = public_key(uc, "vault").encrypt(session_key, OAEP_SHA256)
    try:
        u = unwrap_session_key(uc, "vault", wrapped, "rsa-oaep-sha256")
    except RemoteError as e:
        assert e.status_name == "FAILED_PRECONDITION"
        assert "CKM_RSA_PKCS_OAEP with SHA-256" in e.message
        assert "does not support" in e.message
    else:  # a token that does OAEP-SHA-256 (not SoftHSM2 2.6.1): same code path, it works
        assert u.session_key == session_key


def test_pkcs1v15_is_off_by_default(uc: Client) -> None:
    wrapped = public_key(uc, "vault").encrypt(os.urandom(16), padding.PKCS1v15())
    with pytest.raises(RemoteError) as e:
        unwrap_session_key(uc, "vault", wrapped, "rsa-pkcs1v15")
    name, message = status(e)
    assert name == "FAILED_PRECONDITION"
    assert "allow_pkcs1v15_unwrap" in message


def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_pkcs1v15_implicit_rejection(uc: Client) -> None:
    pub = public_key(uc, "legacy")
    n = pub.public_numbers().n
    session_key = os.urandom(16)
    good = pub.encrypt(session_key, padding.PKCS1v15())
    # Bit flips anywhere (kept below the modulus), random values, and a valid padding
    # around a key of the wrong length: all must look exactly like a success.
    bad = [_flip(good, bit) for bit in (8, 200, 1000, 2040, 2047)]
    bad += [(int.from_bytes(os.urandom(256), "big") % n).to_bytes(256, "big") for _ in range(5)]
    bad.append(pub.encrypt(os.urandom(24), padding.PKCS1v15()))
    bad = [c for c in bad if int.from_bytes(c, "big") < n]
    results = []
    for c in bad:
        first = unwrap_session_key(uc, "legacy", c, "rsa-pkcs1v15")
        again = unwrap_session_key(uc, "legacy", c, "rsa-pkcs1v15")
        assert len(first.session_key) == 16
        assert first.session_key == again.session_key  # deterministic per ciphertext
        assert first.session_key != session_key
        results.append(first.session_key)
    assert len(set(results)) == len(results)  # and different between ciphertexts


def test_malformed_inputs_get_one_message(uc: Client) -> None:
    pub = public_key(uc, "vault")
    n = pub.public_numbers().n
    good = pub.encrypt(os.urandom(16), OAEP_SHA1)
    inputs = [
        b"",
        good[:-1],
        good + b"\x00",
        b"\xff" * 256,
        n.to_bytes(256, "big"),
        _flip(good, 1000),  # right size, OAEP padding wrong
        os.urandom(255) + b"\x00",
    ]
    seen = set()
    for wrapped in inputs:
        for scheme in ("rsa-oaep-sha1",):
            with pytest.raises(RemoteError) as e:
                unwrap_session_key(uc, "vault", wrapped, scheme)
            seen.add(status(e))
    assert seen == {
        ("INVALID_ARGUMENT", "wrapped_key is not a valid ciphertext for key 'vault' version 1")
    }
    # PKCS#1 v1.5 with implicit rejection: the public checks still answer INVALID_ARGUMENT.
    legacy_n = public_key(uc, "legacy").public_numbers().n
    for wrapped in [
        b"",
        b"\x01" * 255,
        b"\x01" * 257,
        b"\xff" * 256,
        legacy_n.to_bytes(256, "big"),
    ]:
        with pytest.raises(RemoteError) as e:
            unwrap_session_key(uc, "legacy", wrapped, "rsa-pkcs1v15")
        assert status(e) == (
            "INVALID_ARGUMENT",
            "wrapped_key is not a valid ciphertext for key 'legacy' version 1",
        )


def test_purposes_are_separate(uc: Client) -> None:
    wrapped = public_key(uc, "signer").encrypt(os.urandom(16), OAEP_SHA1)
    with pytest.raises(RemoteError) as e:
        unwrap_session_key(uc, "signer", wrapped, "rsa-oaep-sha1")
    assert status(e)[0] == "FAILED_PRECONDITION"
    assert "is a sign key; this call needs an unwrap key" in status(e)[1]
    with pytest.raises(RemoteError) as e:
        uc.sign_digest("vault", b"\x00" * 32)
    assert status(e)[0] == "FAILED_PRECONDITION"
    assert "is an unwrap key; this call needs a sign key" in status(e)[1]


def test_unknown_scheme_and_key(uc: Client) -> None:
    from hsmsign.v1 import hsmsign_pb2 as pb

    req = pb.UnwrapSessionKeyRequest(key=pb.KeyRef(name="vault"), wrapped_key=b"x")
    with pytest.raises(RemoteError) as e:
        uc.call(lambda: uc.signer.UnwrapSessionKey(req))
    assert status(e)[0] == "INVALID_ARGUMENT"
    assert "UNWRAP_SCHEME_RSA_OAEP_SHA256" in status(e)[1]
    with pytest.raises(RemoteError) as e:
        unwrap_session_key(uc, "nope", b"x", "rsa-oaep-sha1")
    assert status(e)[0] == "NOT_FOUND"


def test_rewrap_round_trip(uc: Client) -> None:
    session_key = os.urandom(16)
    wrapped = public_key(uc, "vault").encrypt(session_key, OAEP_SHA1)
    r = rewrap_session_key(
        uc, "vault", wrapped, "vault2", from_scheme="rsa-oaep-sha1", to_scheme="rsa-oaep-sha1"
    )
    assert (r.from_key.name, r.to_key.name) == ("vault", "vault2")
    assert r.wrapped_key != wrapped and len(r.wrapped_key) == 256
    again = unwrap_session_key(uc, "vault2", r.wrapped_key, "rsa-oaep-sha1")
    assert again.session_key == session_key
    # A legacy v1.5 key moves to OAEP; the target key decrypts it.
    legacy = public_key(uc, "legacy").encrypt(session_key, padding.PKCS1v15())
    r2 = rewrap_session_key(
        uc, "legacy", legacy, "vault", from_scheme="rsa-pkcs1v15", to_scheme="rsa-oaep-sha1"
    )
    assert unwrap_session_key(uc, "vault", r2.wrapped_key, "rsa-oaep-sha1").session_key == (
        session_key
    )


def test_rewrap_refuses_v15_targets_and_sign_keys(uc: Client) -> None:
    wrapped = public_key(uc, "vault").encrypt(os.urandom(16), OAEP_SHA1)
    with pytest.raises(RemoteError) as e:
        rewrap_session_key(
            uc, "vault", wrapped, "legacy", from_scheme="rsa-oaep-sha1", to_scheme="rsa-pkcs1v15"
        )
    assert status(e)[0] == "INVALID_ARGUMENT"
    with pytest.raises(RemoteError) as e:
        rewrap_session_key(
            uc, "vault", wrapped, "signer", from_scheme="rsa-oaep-sha1", to_scheme="rsa-oaep-sha1"
        )
    assert status(e)[0] == "FAILED_PRECONDITION"


def test_log_holds_no_session_key_or_wrapped_input(uc: Client, unwrap_daemon: Daemon) -> None:
    session_key = os.urandom(16)
    wrapped = public_key(uc, "vault").encrypt(session_key, OAEP_SHA1)
    unwrap_session_key(uc, "vault", wrapped, "rsa-oaep-sha1")
    rewrap_session_key(
        uc, "vault", wrapped, "vault2", from_scheme="rsa-oaep-sha1", to_scheme="rsa-oaep-sha1"
    )
    log = unwrap_daemon.wait_log("unwrap vault v1 rsa-oaep-sha1", "RewrapSessionKey peer=")
    for secret in (session_key, wrapped):
        for form in (secret.hex(), base64.b64encode(secret).decode(), secret.hex()[:32]):
            assert form not in log
        assert repr(secret)[2:40] not in log


def test_implicit_rejection_secret_stays_in_the_token(
    uc: Client, unwrap_daemon: Daemon, tmp_path: Path
) -> None:
    # After a v1.5 call the secret exists; the token must refuse to reveal it.
    from tests.conftest import TokenDir

    pub = public_key(uc, "legacy")
    unwrap_session_key(uc, "legacy", pub.encrypt(b"k" * 16, padding.PKCS1v15()), "rsa-pkcs1v15")
    token = TokenDir(unwrap_daemon.config.parent / "token", "hsmsign-unwrap")
    access = token.object("Secret Key", "hsmsign:implicit-rejection").access
    assert {"sensitive", "always sensitive", "never extractable", "local"} <= access
