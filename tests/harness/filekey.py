"""A Capgo sealer over a private-key FILE, for tests only (never shipped in hsmsign).

It computes the RSA type-1 private operation with Python integers, which are not
constant-time: fine to produce reference bundles from a ``.capgo_key_v2`` test key and to
compare the daemon's bytes with, never for a production key (those live in the HSM).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import keyformats
from hsmsign.capgo.format import (
    RSA_BYTES,
    SESSION_KEY_BYTES,
    BundleFormatError,
    CapgoError,
    ChecksumFormat,
    checksum_signing_input,
    require_rsa_2048,
    type1_block,
)


class FileKeySealer:
    """Sealer backed by a local RSA-2048 private key (e.g. Capgo's ``.capgo_key_v2``).

    The type-1 operation is computed from the private numbers with RSA blinding, and every
    result is checked with the public exponent before it is returned.
    """

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        require_rsa_2048(private_key.key_size)
        self._priv = private_key.private_numbers()
        self._pub = private_key.public_key()
        self._pem = keyformats.pkcs1_pem(self._pub).strip()

    @classmethod
    def from_pem(cls, pem: bytes | str, password: bytes | None = None) -> FileKeySealer:
        """Load a PEM private key (PKCS#1 or PKCS#8). Raises BundleFormatError."""
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        try:
            key = serialization.load_pem_private_key(data, password=password)
        except (ValueError, TypeError) as e:
            raise BundleFormatError(f"cannot load the RSA private key: {e}") from e
        if not isinstance(key, rsa.RSAPrivateKey):
            raise BundleFormatError("the private key is not an RSA key")
        return cls(key)

    @classmethod
    def from_file(cls, path: Path, password: bytes | None = None) -> FileKeySealer:
        """Load a key file such as ``.capgo_key_v2``. Raises BundleFormatError, OSError."""
        return cls.from_pem(Path(path).read_bytes(), password)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return self._pub

    @property
    def public_pem(self) -> str:
        return self._pem

    def _private_encrypt(self, data: bytes) -> bytes:
        m = type1_block(data)
        p, q = self._priv.p, self._priv.q
        n, e = self._priv.public_numbers.n, self._priv.public_numbers.e
        while True:
            r = secrets.randbelow(n - 2) + 2
            try:
                r_inv = pow(r, -1, n)
            except ValueError:
                continue
            break
        blinded = (m * pow(r, e, n)) % n
        # CRT
        s1 = pow(blinded, self._priv.dmp1, p)
        s2 = pow(blinded, self._priv.dmq1, q)
        h = (self._priv.iqmp * (s1 - s2)) % p
        s = ((s2 + h * q) * r_inv) % n
        if pow(s, e, n) != m:  # fault check: never release a wrong signature
            raise CapgoError("RSA private operation self-check failed")
        return s.to_bytes(RSA_BYTES, "big")

    def seal_session_key(self, session_key: bytes) -> bytes:
        if len(session_key) != SESSION_KEY_BYTES:
            raise BundleFormatError(
                f"session key must be {SESSION_KEY_BYTES} bytes, got {len(session_key)}"
            )
        return self._private_encrypt(session_key)

    def sign_checksum(self, digest: bytes, fmt: ChecksumFormat) -> bytes:
        return self._private_encrypt(checksum_signing_input(digest, fmt))

    def sign_checksums(self, digests: Sequence[bytes], fmt: ChecksumFormat) -> list[bytes]:
        return [self.sign_checksum(d, fmt) for d in digests]
