"""``hsmsign unwrap key|rewrap|bundle`` against a real daemon (the unwrap token of test_unwrap)."""

from __future__ import annotations

import base64
import os
import zlib
from pathlib import Path

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.asymmetric import padding as asym
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmsign.client import Client
from tests.conftest import Daemon
from tests.harness import leaks
from tests.integration.test_unwrap import OAEP_SHA1, OAEP_SHA256, public_key, uc, unwrap_daemon

__all__ = ["uc", "unwrap_daemon"]  # the fixtures, shared with test_unwrap


def make_v1_bundle(
    tmp: Path, c: Client, oaep: asym.OAEP, size: int = 3 * (1 << 20) + 5
) -> tuple[Path, bytes, str, str]:
    """A Capgo v1 bundle: AES-128-CBC/PKCS#7 payload, ivSessionKey with an OAEP-wrapped key."""
    plain = os.urandom(size)
    key, iv = os.urandom(16), os.urandom(16)
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    data = enc.update(padder.update(plain) + padder.finalize()) + enc.finalize()
    path = tmp / "bundle.zip.enc"
    path.write_bytes(data)
    wrapped = public_key(c, "vault").encrypt(key, oaep)
    ivsk = f"{base64.b64encode(iv).decode()}:{base64.b64encode(wrapped).decode()}"
    return path, plain, ivsk, f"{zlib.crc32(plain):08x}"


def test_unwrap_key_prints_the_session_key(uc: Client, unwrap_daemon: Daemon) -> None:
    session_key = os.urandom(16)
    leaks.remember(session_key, "the session key hsmsign unwrap key prints")
    wrapped = public_key(uc, "vault").encrypt(session_key, OAEP_SHA1)
    b64 = base64.b64encode(wrapped).decode()
    r = unwrap_daemon.hsmsign(
        "unwrap", "key", "--key", "vault", "--scheme", "rsa-oaep-sha1", "--wrapped-b64", b64
    )
    assert base64.b64decode(r.stdout.strip()) == session_key
    r = unwrap_daemon.hsmsign(
        "unwrap", "key", "--key", "vault@1", "--scheme", "rsa-oaep-sha1",
        "--wrapped-b64", b64, "--format", "hex",
    )  # fmt: skip
    assert r.stdout.decode().strip() == session_key.hex()


def test_unwrap_key_sha256_on_softhsm_fails_clearly(uc: Client, unwrap_daemon: Daemon) -> None:
    session_key = os.urandom(16)
    wrapped = public_key(uc, "vault").encrypt(session_key, OAEP_SHA256)
    r = unwrap_daemon.hsmsign(
        "unwrap", "key", "--key", "vault", "--wrapped-b64",
        base64.b64encode(wrapped).decode(), check=False,
    )  # fmt: skip
    err = r.stderr.decode()
    if r.returncode != 0:
        assert r.returncode == 1
        assert "FAILED_PRECONDITION" in err and "CKM_RSA_PKCS_OAEP with SHA-256" in err
        assert "Traceback" not in err
    else:
        # A token that has OAEP with SHA-256 (a real HSM): the very key that was wrapped.
        assert base64.b64decode(r.stdout.strip(), validate=True) == session_key
        assert session_key.hex() not in err


def test_rewrap_cli_keeps_the_iv(uc: Client, unwrap_daemon: Daemon, tmp_path: Path) -> None:
    bundle, plain, ivsk, crc = make_v1_bundle(tmp_path, uc, OAEP_SHA1, size=1000)
    r = unwrap_daemon.hsmsign(
        "unwrap", "rewrap", "--from-key", "vault", "--to-key", "vault2",
        "--from-scheme", "rsa-oaep-sha1", "--to-scheme", "rsa-oaep-sha1",
        "--iv-session-key", ivsk,
    )  # fmt: skip
    new_ivsk = r.stdout.decode().strip()
    assert new_ivsk.split(":")[0] == ivsk.split(":")[0] and new_ivsk != ivsk
    out = tmp_path / "plain.zip"
    # The legacy bundle now opens with the new key.
    unwrap_daemon.hsmsign(
        "unwrap", "bundle", str(bundle), "--key", "vault2", "--scheme", "rsa-oaep-sha1",
        "--iv-session-key", new_ivsk, "--checksum", crc, "-o", str(out),
    )  # fmt: skip
    assert out.read_bytes() == plain


def test_bundle_decrypt_v1(uc: Client, unwrap_daemon: Daemon, tmp_path: Path) -> None:
    bundle, plain, ivsk, crc = make_v1_bundle(tmp_path, uc, OAEP_SHA1)
    out = tmp_path / "out" / "bundle.zip"
    out.parent.mkdir()
    r = unwrap_daemon.hsmsign(
        "unwrap", "bundle", str(bundle), "--key", "vault", "--scheme", "rsa-oaep-sha1",
        "--iv-session-key", ivsk, "--checksum", crc, "-o", str(out),
    )  # fmt: skip
    assert out.read_bytes() == plain
    err = r.stderr.decode()
    assert f"crc32 {crc} (checksum matches)" in err
    assert "decrypting [" not in err  # no progress bar when stderr is not a terminal
    assert sorted(p.name for p in out.parent.iterdir()) == ["bundle.zip"]


def test_bundle_decrypt_failures_leave_no_file(
    uc: Client, unwrap_daemon: Daemon, tmp_path: Path
) -> None:
    bundle, _plain, ivsk, crc = make_v1_bundle(tmp_path, uc, OAEP_SHA1, size=70_000)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "bundle.zip"
    base = ["unwrap", "bundle", str(bundle), "--key", "vault", "--iv-session-key"]
    # Wrong checksum: verification failure, exit 3.
    wrong = f"{(int(crc, 16) ^ 1):08x}"
    r = unwrap_daemon.hsmsign(
        *base, ivsk, "--scheme", "rsa-oaep-sha1", "--checksum", wrong, "-o", str(out), check=False
    )
    assert r.returncode == 3 and "checksum mismatch" in r.stderr.decode()
    # Truncated payload. A size that is not a multiple of the block size always fails; a
    # whole block cut off may still unpad by chance (1 in 256), so the checksum catches it.
    full = bundle.read_bytes()
    bundle.write_bytes(full[:-1])
    r = unwrap_daemon.hsmsign(*base, ivsk, "--scheme", "rsa-oaep-sha1", "-o", str(out), check=False)
    assert r.returncode == 3
    bundle.write_bytes(full[:-16])
    r = unwrap_daemon.hsmsign(
        *base, ivsk, "--scheme", "rsa-oaep-sha1", "--checksum", crc, "-o", str(out), check=False
    )
    assert r.returncode == 3
    # Capgo v1's own scheme (OAEP-SHA-256) on SoftHSM2: the documented status, exit 1.
    _b, plain256, ivsk256, _c = make_v1_bundle(tmp_path, uc, OAEP_SHA256, size=100)
    r = unwrap_daemon.hsmsign(*base, ivsk256, "-o", str(out), check=False)
    if r.returncode != 0:
        assert r.returncode == 1
        assert "FAILED_PRECONDITION" in r.stderr.decode()
    else:
        assert out.read_bytes() == plain256  # a token with OAEP-SHA-256 decrypts it
        out.unlink()
    assert list(outdir.iterdir()) == []


def test_unusable_arguments_are_usage_errors(unwrap_daemon: Daemon, tmp_path: Path) -> None:
    r = unwrap_daemon.hsmsign(
        "unwrap", "bundle", str(tmp_path / "missing"), "--key", "vault",
        "--iv-session-key", "nocolon", "-o", str(tmp_path / "o"), check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "IV:WRAPPED_KEY" in r.stderr.decode()
    r = unwrap_daemon.hsmsign("unwrap", "key", "--key", "vault", "--wrapped-b64", "!!", check=False)
    assert r.returncode == 2
