"""Capgo's older ("v1") bundle encryption, for decrypting bundles made before CLI 5.0.0.

v1: ``ivSessionKey = b64(iv) ":" b64(RSA-OAEP-SHA-256(session key))`` to the key holder's
public key; the payload is AES-128-CBC with PKCS#7 padding; the checksum was an unsigned
CRC32 (``%08x``) of the plain zip. The RSA part is unwrapped by hsmsignd (the private key
stays in the HSM); this module only parses the field and decrypts the payload locally,
streaming, into an output file that appears only if everything succeeded.
"""

from __future__ import annotations

import binascii
import hashlib
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Final

from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmsign._files import atomic_output
from hsmsign.errors import UsageError, VerificationError

CHUNK_BYTES: Final = 1 << 20

#: Called with (bytes done, bytes total) after each chunk.
Progress = Callable[[int, int], None]


def parse_iv_session_key(text: str) -> tuple[bytes, bytes]:
    """(iv, wrapped session key) from an ivSessionKey field. Raises UsageError."""
    parts = text.strip().split(":")
    if len(parts) != 2 or not all(parts):
        raise UsageError("ivSessionKey must be two base64 parts joined by ':' (IV:WRAPPED_KEY)")
    try:
        iv, wrapped = (binascii.a2b_base64(p.encode(), strict_mode=True) for p in parts)
    except binascii.Error:
        raise UsageError("ivSessionKey is not valid base64") from None
    if len(iv) != 16:
        raise UsageError(f"the IV in ivSessionKey is {len(iv)} bytes; AES-CBC needs 16")
    return iv, wrapped


class _Checksum:
    """Capgo v1's CRC32 (8 hex characters) or, if 64 hex characters are given, SHA-256."""

    def __init__(self, expected: str) -> None:
        self.expected = expected.strip().lower()
        if len(self.expected) == 8:
            self._crc = 0
            self._sha: hashlib._Hash | None = None
        elif len(self.expected) == 64:
            self._sha = hashlib.sha256()
        else:
            raise UsageError(
                "--checksum must be a CRC32 (8 hex characters, Capgo v1) or a SHA-256 "
                "(64 hex characters)"
            )
        if any(c not in "0123456789abcdef" for c in self.expected):
            raise UsageError("--checksum must be hexadecimal")

    def update(self, data: bytes) -> None:
        if self._sha is not None:
            self._sha.update(data)
        else:
            self._crc = zlib.crc32(data, self._crc)

    def actual(self) -> str:
        return self._sha.hexdigest() if self._sha is not None else f"{self._crc & 0xFFFFFFFF:08x}"


def decrypt_v1_bundle(
    encrypted: Path,
    output: Path,
    session_key: bytes,
    iv: bytes,
    *,
    checksum: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Decrypts a v1 bundle into ``output``; returns the plain zip's CRC32 (``%08x``).

    Streams in 1 MiB chunks. ``checksum`` (CRC32 hex, or SHA-256 hex) is checked before the
    output appears. Raises UsageError for unreadable input or bad sizes, VerificationError
    for a wrong key (bad padding) or a checksum mismatch; on any failure no output file is
    left behind.
    """
    if len(session_key) not in (16, 24, 32):
        raise UsageError(f"the session key is {len(session_key)} bytes; AES needs 16, 24 or 32")
    if len(iv) != 16:
        raise UsageError(f"the IV is {len(iv)} bytes; AES-CBC needs 16")
    check = _Checksum(checksum) if checksum is not None else None
    try:
        total = encrypted.stat().st_size
        src = encrypted.open("rb")
    except OSError as e:
        raise UsageError(f"cannot read {encrypted}: {e.strerror}") from None
    if total == 0 or total % 16:
        src.close()
        raise VerificationError(
            f"{encrypted} is {total} bytes: not an AES-CBC ciphertext (a multiple of 16)"
        )
    decryptor = Cipher(algorithms.AES(session_key), modes.CBC(iv)).decryptor()
    unpadder = sym_padding.PKCS7(128).unpadder()
    crc = 0
    done = 0

    def emit(out_f: IO[bytes], data: bytes) -> None:
        nonlocal crc
        crc = zlib.crc32(data, crc)
        if check is not None:
            check.update(data)
        out_f.write(data)

    try:
        with src, atomic_output(output) as out:
            for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
                emit(out, unpadder.update(decryptor.update(chunk)))
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            try:
                emit(out, unpadder.update(decryptor.finalize()) + unpadder.finalize())
            except ValueError:
                raise VerificationError(
                    f"{encrypted} does not decrypt with this session key and IV (bad padding)"
                ) from None
            if check is not None and check.actual() != check.expected:
                raise VerificationError(
                    f"checksum mismatch: the decrypted bundle has {check.actual()}, "
                    f"expected {check.expected}"
                )
    except OSError as e:
        raise UsageError(f"cannot write {output}: {e.strerror}") from None
    return f"{crc & 0xFFFFFFFF:08x}"
