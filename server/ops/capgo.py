"""The Capgo (capacitor-updater) raw operations.

Each is ``C_Sign`` with ``CKM_RSA_PKCS`` over raw bytes (OpenSSL's private-encrypt with PKCS#1
type-1 padding, byte-identical to the Capgo CLI: docs/design-facts.md, fact 5). That signs
whatever it is given, so every operation here checks its input length strictly and signs
nothing but a 16-byte session key or a checksum signing input derived here from a 32-byte
SHA-256 digest. Only RSA-2048 keys are accepted: capacitor-updater rejects anything else.
"""

from __future__ import annotations

from collections.abc import Sequence

import hsmsign.capgo.format as capgo
from server.errors import FailedPrecondition, InvalidArgument
from server.keyring.model import KeyReference, KeyVersion, Purpose
from server.keyring.ring import KeyRing
from server.ops.signing import MAX_BATCH, sign_blocks
from server.pkcs11.mechanisms import RSA_PKCS
from server.pkcs11.token import Token

_WHAT = "Capgo private-encrypt (CKM_RSA_PKCS)"


def _length(name: str, value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise InvalidArgument(f"{name} is {len(value)} bytes; it must be exactly {size} ({what})")
    return value


def _signing_input(digest: bytes, fmt: capgo.ChecksumFormat, name: str) -> bytes:
    _length(name, digest, 32, "the SHA-256 of the plain bundle zip")
    return capgo.checksum_signing_input(digest, fmt)


def capgo_key(ring: KeyRing, ref: KeyReference) -> KeyVersion:
    """The signing key version ``ref`` names; raises what ``KeyRing.resolve`` raises, and
    FailedPrecondition unless it is RSA-2048."""
    key = ring.resolve(ref, Purpose.SIGN)
    if key.bits != capgo.CAPGO_RSA_BITS:
        raise FailedPrecondition(
            f"{key.describe()} is RSA-{key.bits}; capacitor-updater requires RSA-2048 "
            "(devices reject other sizes): use an RSA-2048 key for Capgo bundles"
        )
    return key


def _private_encrypt(token: Token, key: KeyVersion, blocks: Sequence[bytes]) -> list[bytes]:
    return sign_blocks(token, key, RSA_PKCS, list(blocks), _WHAT)


def seal_session_key(
    token: Token, ring: KeyRing, ref: KeyReference, session_key: bytes
) -> tuple[KeyVersion, bytes]:
    """The 16-byte AES session key sealed with the private key (Capgo's ivSessionKey half).

    Raises InvalidArgument for another length, FailedPrecondition for a key not RSA-2048.
    """
    block = _length("session_key", session_key, 16, "an AES-128 key")
    key = capgo_key(ring, ref)
    (sealed,) = _private_encrypt(token, key, [block])
    return key, sealed


def sign_checksum(
    token: Token,
    ring: KeyRing,
    ref: KeyReference,
    checksum_sha256: bytes,
    fmt: capgo.ChecksumFormat,
) -> tuple[KeyVersion, bytes]:
    """The raw signature of a bundle checksum in format ``fmt``.

    Raises InvalidArgument unless the checksum is 32 bytes, FailedPrecondition for a key not
    RSA-2048.
    """
    block = _signing_input(checksum_sha256, fmt, "checksum_sha256")
    key = capgo_key(ring, ref)
    (sig,) = _private_encrypt(token, key, [block])
    return key, sig


def seal_bundle(
    token: Token,
    ring: KeyRing,
    ref: KeyReference,
    session_key: bytes,
    iv: bytes,
    checksum_sha256: bytes,
    fmt: capgo.ChecksumFormat,
) -> tuple[KeyVersion, str, str]:
    """The key used, and the ivSessionKey and signed checksum of one bundle (as Capgo
    writes them).

    Raises InvalidArgument for a wrong length of any input, FailedPrecondition for a key not
    RSA-2048.
    """
    session_key = _length("session_key", session_key, 16, "an AES-128 key")
    iv = _length("iv", iv, 16, "the AES-CBC IV")
    block = _signing_input(checksum_sha256, fmt, "checksum_sha256")
    key = capgo_key(ring, ref)
    sealed, sig = _private_encrypt(token, key, [session_key, block])
    return key, capgo.format_iv_session_key(iv, sealed), capgo.encode_signed_checksum(sig, fmt)


def sign_checksums(
    token: Token,
    ring: KeyRing,
    ref: KeyReference,
    checksums_sha256: Sequence[bytes],
    fmt: capgo.ChecksumFormat,
) -> tuple[KeyVersion, list[str]]:
    """The signed checksums (as Capgo writes them) of many bundles or files, in order.

    Raises InvalidArgument for an empty or oversized batch or a checksum not 32 bytes,
    FailedPrecondition for a key not RSA-2048.
    """
    n = len(checksums_sha256)
    if not 0 < n <= MAX_BATCH:
        raise InvalidArgument(f"{n} checksums in one call; send 1 to {MAX_BATCH:,}")
    blocks = [
        _signing_input(d, fmt, f"checksums_sha256[{i}]") for i, d in enumerate(checksums_sha256)
    ]
    key = capgo_key(ring, ref)
    sigs = _private_encrypt(token, key, blocks)
    return key, [capgo.encode_signed_checksum(s, fmt) for s in sigs]


def encode_signed_checksum(signature: bytes, fmt: capgo.ChecksumFormat) -> str:
    """A raw checksum signature as Capgo writes it in format ``fmt``."""
    return capgo.encode_signed_checksum(signature, fmt)
