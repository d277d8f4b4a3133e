"""Capgo's older ("v1") bundle encryption, for decrypting bundles made before CLI 5.0.0.

v1: ``ivSessionKey = b64(iv) ":" b64(RSA-OAEP-SHA-256(session key))`` to the key holder's
public key; the payload is AES-128-CBC with PKCS#7 padding; the checksum was an unsigned
CRC32 (``%08x``) of the plain zip. The RSA part is unwrapped by hsmsignd (the private key
stays in the HSM); this module decrypts the payload locally, streaming, into an output file
that appears only if everything succeeded.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

from hsmsign._internal import aescbc
from hsmsign._internal.files import atomic_output
from hsmsign._internal.progress import Progress
from hsmsign.capgo.format import IV_BYTES, parse_iv_session_key
from hsmsign.errors import UsageError, VerificationError

#: How Capgo v1 wrapped the session key; the one default of every v1 decryption.
V1_UNWRAP_SCHEME: Final = "rsa-oaep-sha256"
_CRC32_HEX: Final = 8
_SHA256_HEX: Final = 64

#: Unwraps the session key of an ivSessionKey (with the daemon): wrapped key -> AES key.
Unwrap = Callable[[bytes], bytes]


class _Checksum:
    """Capgo v1's CRC32 (8 hex characters) or, if 64 hex characters are given, SHA-256."""

    def __init__(self, expected: str) -> None:
        self.expected = expected.strip().lower()
        if len(self.expected) not in (_CRC32_HEX, _SHA256_HEX):
            raise UsageError(
                "--checksum must be a CRC32 (8 hex characters, Capgo v1) or a SHA-256 "
                "(64 hex characters)"
            )
        if any(c not in "0123456789abcdef" for c in self.expected):
            raise UsageError("--checksum must be hexadecimal")

    def matches(self, crc32: str, sha256_hex: str) -> bool:
        return self.expected == (crc32 if len(self.expected) == _CRC32_HEX else sha256_hex)


def decrypt_v1_bundle(
    encrypted: Path,
    output: Path,
    iv_session_key: str,
    unwrap: Unwrap,
    *,
    checksum: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Decrypts a v1 bundle into ``output``; returns the plain zip's CRC32 (``%08x``).

    The ivSessionKey is parsed and the input checked before ``unwrap`` is called. Streams in
    1 MiB chunks. ``checksum`` (CRC32 hex, or SHA-256 hex) is checked before the output
    appears; a file already at ``output`` survives any failure. Raises UsageError for
    unreadable input, bad sizes or a missing output folder, VerificationError for a wrong key
    (bad padding) or a checksum mismatch, and whatever ``unwrap`` raises.
    """
    iv, wrapped = parse_iv_session_key(iv_session_key)
    if len(iv) != IV_BYTES:
        raise UsageError(f"the IV in ivSessionKey is {len(iv)} bytes; AES-CBC needs 16")
    check = _Checksum(checksum) if checksum is not None else None
    try:
        total = encrypted.stat().st_size
    except OSError as e:
        raise UsageError(f"cannot read {encrypted}: {e.strerror}") from None
    if total == 0 or total % aescbc.AES_BLOCK:
        raise VerificationError(
            f"{encrypted} is {total} bytes: not an AES-CBC ciphertext (a multiple of 16)"
        )
    session_key = unwrap(wrapped)
    if len(session_key) not in (16, 24, 32):
        raise UsageError(f"the session key is {len(session_key)} bytes; AES needs 16, 24 or 32")
    crc = 0

    def observe(data: bytes) -> None:
        nonlocal crc
        crc = zlib.crc32(data, crc)

    with encrypted.open("rb", buffering=0) as src, atomic_output(output) as out:
        try:
            digest, _ = aescbc.decrypt_stream(
                src, out, session_key, iv, total, progress, observe=observe
            )
        except aescbc.BadPadding:
            raise VerificationError(
                f"{encrypted} does not decrypt with this session key and IV (bad padding)"
            ) from None
        crc32 = f"{crc & 0xFFFFFFFF:08x}"
        if check is not None and not check.matches(crc32, digest.hex()):
            actual = crc32 if len(check.expected) == _CRC32_HEX else digest.hex()
            raise VerificationError(
                f"checksum mismatch: the decrypted bundle has {actual}, expected {check.expected}"
            )
    return crc32
