"""seal_bundle commits its output only after every step: an existing file survives a
failed signature or self-check byte for byte, and no temp file is left behind."""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign.capgo.bundle import seal_bundle
from hsmsign.capgo.format import BundleVerificationError, ChecksumFormat
from tests.harness.filekey import FileKeySealer


class SigningRefused(Exception):
    pass


class RefusesChecksums(FileKeySealer):
    """Seals the session key, then refuses to sign (as a daemon does for a key disabled in
    between)."""

    def sign_checksum(self, digest: bytes, fmt: ChecksumFormat) -> bytes:
        raise SigningRefused("no")

    def sign_checksums(self, digests: Sequence[bytes], fmt: ChecksumFormat) -> list[bytes]:
        raise SigningRefused("no")


class SignsTheWrongBytes(FileKeySealer):
    def sign_checksum(self, digest: bytes, fmt: ChecksumFormat) -> bytes:
        return super().sign_checksum(bytes(32), fmt)


@pytest.fixture(scope="module")
def private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("sealer_class", "error"),
    [(RefusesChecksums, SigningRefused), (SignsTheWrongBytes, BundleVerificationError)],
)
def test_failed_signing_keeps_the_previous_output(
    tmp_path: Path,
    private_key: rsa.RSAPrivateKey,
    sealer_class: type[FileKeySealer],
    error: type[Exception],
) -> None:
    plain = tmp_path / "b.zip"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("index.html", "<html>x</html>")
    out = tmp_path / "b_encrypted.zip"
    out.write_bytes(b"the previous good release")
    with pytest.raises(error):
        seal_bundle(plain, out, sealer_class(private_key), ChecksumFormat.V3)
    assert out.read_bytes() == b"the previous good release"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zip", "b_encrypted.zip"]
