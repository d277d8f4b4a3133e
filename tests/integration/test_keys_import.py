"""Import (migration from a Capgo key file), two daemons sharing one token's ring state, and
the start-up refusals, each on its own SoftHSM2 token."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256

from hsmsign import key_wrap, keyformats
from hsmsign.admin import KeyAdmin
from hsmsign.client import Client
from hsmsign.errors import RemoteError
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.conftest import (
    HSMSIGND,
    Daemon,
    TokenDir,
    hsmsignd,
    make_token,
    start_daemon,
    write_config,
)
from tests.harness import script
from tests.harness.daemons import running_daemon
from tests.harness.tokens import token_with_keys

KEYRING = (
    "[keyring]\nmin_destruction_delay_hours = 0\ndev_unsafe_allow_short_destruction_delay = true\n"
    "refresh_seconds = 0.5\n"
)
DIGEST = hashlib.sha256(b"bundle").digest()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenDir, Path, Daemon]]:
    tmp = tmp_path_factory.mktemp("import")
    t, config = token_with_keys(tmp, ["app"], extra=KEYRING)
    with running_daemon(config, tmp / "daemon") as d:
        yield t, config, d


def _pem_pkcs1(key: rsa.RSAPrivateKey, password: bytes | None = None) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption(),
    )


def _verify(pub: rsa.RSAPublicKey, signature: bytes) -> None:
    pub.verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(SHA256()))


def test_import_round_trip(shared: tuple[TokenDir, Path, Daemon], tmp_path: Path) -> None:
    token, _config, daemon = shared
    original = rsa.generate_private_key(65537, 2048)
    key_file = tmp_path / ".capgo_key_v2"
    key_file.write_bytes(_pem_pkcs1(original))
    r = daemon.hsmsign("keys", "import", str(key_file), "--name", "capgo", "--json")
    out = json.loads(r.stdout)
    pub = original.public_key()
    assert out["fingerprint"] == keyformats.fingerprint(pub)
    assert out["capgo_key_id"] == keyformats.capgo_key_id(pub)
    assert out["provenance"]["imported"] is True and out["provenance"]["local"] is False
    assert out["provenance"]["extractable"] is False and out["provenance"]["sensitive"] is True
    assert out["pkcs1_pem"] == keyformats.pkcs1_pem(pub)
    assert "shred -u" in r.stderr.decode()
    with Client(daemon.address) as c:
        sig = c.sign_digest("capgo", DIGEST)
        _verify(pub, sig.signature)
        assert sig.key.fingerprint == keyformats.fingerprint(pub)
    access = token.object("Private Key", "hsmsign:capgo:v1").access
    assert "sensitive" in access and "local" not in access
    assert "extractable" not in access
    # The same key again is refused, wherever it would go.
    for name in ("capgo", "other"):
        r2 = daemon.hsmsign("keys", "import", str(key_file), "--name", name, check=False)
        assert r2.returncode == 1
        assert b"FAILED_PRECONDITION" in r2.stderr and b"already in the ring" in r2.stderr


def test_import_as_new_version_of_an_existing_key(
    shared: tuple[TokenDir, Path, Daemon], tmp_path: Path
) -> None:
    _token, config, daemon = shared
    original = rsa.generate_private_key(65537, 2048)
    der = tmp_path / "key.der"
    der.write_bytes(
        original.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # Offline, straight on the token, while the daemon runs.
    r = hsmsignd(config, "keys", "import", str(der), "--name", "app", "--json")
    out = json.loads(r.stdout)
    assert out["version"] >= 2 and out["primary"] is False
    with Client(daemon.address) as c:
        deadline = time.monotonic() + 10
        while True:
            try:
                sig = c.sign_digest(f"app@{out['version']}", DIGEST)
                break
            except RemoteError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
    _verify(original.public_key(), sig.signature)


def test_encrypted_pem_needs_a_passphrase(
    shared: tuple[TokenDir, Path, Daemon], tmp_path: Path
) -> None:
    _token, _config, daemon = shared
    original = rsa.generate_private_key(65537, 2048)
    enc = tmp_path / "enc.pem"
    enc.write_bytes(_pem_pkcs1(original, b"s3cret"))
    r = daemon.hsmsign("keys", "import", str(enc), "--name", "enc", check=False)
    err = r.stderr.decode()
    assert r.returncode != 0 and "encrypted" in err and "--passphrase-file" in err
    assert "Traceback" not in err
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    r = daemon.hsmsign(
        "keys", "import", str(enc), "--name", "enc", "--passphrase-file", str(pw), "--json"
    )
    assert json.loads(r.stdout)["fingerprint"] == keyformats.fingerprint(original.public_key())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ec.generate_private_key(ec.SECP256R1()), "only RSA"),
        (lambda: rsa.generate_private_key(65537, 1024), "under 2048"),  # noqa: S505 (refused)
    ],
    ids=["ec", "rsa-1024"],
)
def test_import_refusals(
    shared: tuple[TokenDir, Path, Daemon], tmp_path: Path, make: object, message: str
) -> None:
    _token, config, daemon = shared
    key = make()  # type: ignore[operator]
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    f = tmp_path / "k.pem"
    f.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    r = daemon.hsmsign("keys", "import", str(f), "--name", "refused", check=False)
    assert r.returncode != 0 and message in r.stderr.decode()
    r2 = hsmsignd(config, "keys", "import", str(f), "--name", "refused", check=False)
    assert r2.returncode != 0 and "Traceback" not in r2.stderr
    # The daemon refuses too, whatever a client sends (wrapped, with the key's own SPKI).
    with Client(daemon.address) as c, pytest.raises(RemoteError) as e:
        spki = (
            keyformats.spki_der(key.public_key())
            if isinstance(key, rsa.RSAPrivateKey)
            else (
                key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        )
        wrapped = key_wrap.wrap_pkcs8(der, spki, KeyAdmin(c).import_wrapping_key())
        req = pb.ImportKeyRequest(name="refused", purpose=pb.KEY_PURPOSE_SIGN, wrapped=wrapped)
        c.call(lambda: c.admin.ImportKey(req, timeout=60))
    assert e.value.status_name == "INVALID_ARGUMENT"
    with Client(daemon.address) as c, pytest.raises(RemoteError) as e:
        KeyAdmin(c).get_key("refused")
    assert e.value.status_name == "NOT_FOUND"


def test_two_daemons_share_the_ring(shared: tuple[TokenDir, Path, Daemon], tmp_path: Path) -> None:
    """A rotation made through one daemon is used by the other without a restart."""
    _token, config, a = shared
    b = start_daemon(config, tmp_path / "b")
    try:
        with Client(a.address) as ca, Client(b.address) as cb:
            before = cb.sign_digest("app", DIGEST).key.version
            key = KeyAdmin(ca).rotate_key("app", make_primary=True)
            new = key.primary_version
            assert new > before
            deadline = time.monotonic() + 10  # refresh_seconds is 0.5
            while cb.sign_digest("app", DIGEST).key.version != new:
                assert time.monotonic() < deadline, "daemon B never saw the rotation"
                time.sleep(0.1)
            # And the other way round: B disables the old version, A refuses it.
            KeyAdmin(cb).disable("app", before)
            deadline = time.monotonic() + 10
            while True:
                try:
                    ca.sign_digest(f"app@{before}", DIGEST)
                except RemoteError as e:
                    assert e.status_name == "FAILED_PRECONDITION"
                    break
                assert time.monotonic() < deadline, "daemon A never saw the disable"
                time.sleep(0.1)
            # The token refuses it at once (docs/adr/0007); A lists it within refresh_seconds.
            while True:
                states = {v.version: v.state for v in KeyAdmin(ca).get_key("app").versions}
                if states[before] == pb.KEY_VERSION_STATE_DISABLED:
                    break
                assert time.monotonic() < deadline, "daemon A never listed the disable"
                time.sleep(0.1)
    finally:
        b.stop()


def _serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HSMSIGND, "--config", str(config), "serve", "--listen", "127.0.0.1:0"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_config_for_an_unknown_key_stops_start_up(tmp_path: Path) -> None:
    t = make_token(tmp_path / "token")
    config = write_config(tmp_path / "c.toml", t, extra="[keys.nope]\nallow_extractable = true\n")
    r = _serve(config)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if "hsmsignd:" in line]
    assert len(lines) == 1 and "[keys.nope]" in lines[0]
    assert "Traceback" not in r.stderr


def test_extractable_key_is_refused_unless_allowed(tmp_path: Path) -> None:
    t = make_token(tmp_path / "token")
    # pkcs11-tool cannot make a sign-only key on SoftHSM (decrypt is on by default), so make
    # it with python-pkcs11 in a child process, as a careless tool would: extractable.
    subprocess.run(
        [sys.executable, script("make_extractable_key.py"), t.label, t.pin],
        env=t.env(),
        check=True,
        timeout=60,
    )
    config = write_config(tmp_path / "c.toml", t, extra=KEYRING)
    d = start_daemon(config, tmp_path / "d1")
    try:
        with Client(d.address) as c:
            with pytest.raises(RemoteError) as e:
                c.sign_digest("ext", DIGEST)
            assert e.value.status_name == "FAILED_PRECONDITION"
            assert "'ext' version 1" in e.value.message and "allow_extractable" in e.value.message
            v = KeyAdmin(c).get_key("ext").versions[0]
            assert v.provenance.extractable and not v.provenance.never_extractable
    finally:
        d.stop()
    assert "WARNING" in d.log() and "extractable" in d.log()
    allowed = write_config(
        tmp_path / "allowed.toml", t, extra=KEYRING + "[keys.ext]\nallow_extractable = true\n"
    )
    d2 = start_daemon(allowed, tmp_path / "d2")
    try:
        with Client(d2.address) as c:
            sig = c.sign_digest("ext", DIGEST)
            pub = serialization.load_der_public_key(c.public_key("ext").spki_der)
            assert isinstance(pub, rsa.RSAPublicKey)
            _verify(pub, sig.signature)
    finally:
        d2.stop()
