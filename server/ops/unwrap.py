"""Session-key unwrap and rewrap with a key version whose purpose is unwrap.

The private key never leaves the token; the session key does (it is the caller's result).
Three schemes, each one fixed mechanism from ``server.pkcs11.mechanisms``:

- RSA-OAEP with SHA-1 or SHA-256 (MGF1 of the same hash, empty label): C_UnwrapKey into a
  session object that is read and destroyed, or C_Decrypt where the token lacks unwrap. Every
  ciphertext the token rejects gets the same INVALID_ARGUMENT message as a malformed one.
- RSAES-PKCS1-v1_5, off unless ``[keys.NAME] allow_pkcs1v15_unwrap = true``, with implicit
  rejection: a ciphertext whose padding is wrong gets a deterministic pseudo-random 16-byte
  key (HMAC-SHA-256 in the token, under a per-token secret, of the key's fingerprint and the
  ciphertext) with the same status, message and length as a real one, so the call is no
  Bleichenbacher/Marvin padding oracle. See docs/unwrap.md for the residual timing risk.

Nothing here logs a session key or a wrapped input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from server.config import KeyOptions
from server.errors import FailedPrecondition, InvalidArgument, MechanismUnsupported
from server.keyring.model import KeyVersion
from server.pkcs11.mechanisms import RSA_OAEP_SHA1, RSA_OAEP_SHA256, RSA_PKCS, RSA_X_509, Mech
from server.pkcs11.session import Session
from server.pkcs11.token import Token

#: Length of a PKCS#1 v1.5 session key, and of the implicit-rejection key: AES-128, as in
#: Capgo's bundles. A v1.5 plaintext of any other length is treated like bad padding (a
#: length that differed between real and synthetic keys would itself be an oracle).
PKCS1V15_KEY_BYTES: Final = 16

#: Domain separation for the implicit-rejection HMAC input.
_IR_CONTEXT: Final = b"hsmsign implicit rejection v1\x00"


@dataclass(frozen=True)
class UnwrapScheme:
    """How a session key was wrapped to an RSA public key."""

    name: str
    mech: Mech
    #: The OAEP hash (for re-encrypting to a public key); None for PKCS#1 v1.5.
    oaep_hash: type[hashes.HashAlgorithm] | None

    @property
    def implicit_rejection(self) -> bool:
        return self.oaep_hash is None


SCHEMES: Final[dict[str, UnwrapScheme]] = {
    s.name: s
    for s in (
        UnwrapScheme("rsa-oaep-sha1", RSA_OAEP_SHA1, hashes.SHA1),
        UnwrapScheme("rsa-oaep-sha256", RSA_OAEP_SHA256, hashes.SHA256),
        UnwrapScheme("rsa-pkcs1v15", RSA_PKCS, None),
    )
}

#: Tokens (by id) that refused raw RSA: they use CKM_RSA_PKCS for v1.5 instead.
_RAW_RSA_REFUSED: set[int] = set()


def invalid_ciphertext(key: KeyVersion) -> InvalidArgument:
    """The one message for every bad input to a key, whatever the reason."""
    return InvalidArgument(
        f"wrapped_key is not a valid ciphertext for key {key.name!r} version {key.version}"
    )


def _check_ciphertext(key: KeyVersion, wrapped: bytes) -> None:
    """Public checks only (length, value below the modulus): they reveal nothing secret."""
    size = (key.bits + 7) // 8
    n = key.public_key.public_numbers().n
    # Evaluate both conditions whatever the first says, so the message is the only output.
    bad_length = len(wrapped) != size
    bad_value = int.from_bytes(wrapped, "big") >= n
    if bad_length | bad_value:
        raise invalid_ciphertext(key)


def _check_allowed(key: KeyVersion, scheme: UnwrapScheme, options: KeyOptions) -> None:
    if scheme.implicit_rejection and not options.allow_pkcs1v15_unwrap:
        raise FailedPrecondition(
            f"PKCS#1 v1.5 unwrap is disabled for key {key.name!r}: it is only for legacy data; "
            f"enable it with allow_pkcs1v15_unwrap = true under [keys.{key.name}] "
            "(see docs/unwrap.md)"
        )


def unwrap_session_key(
    token: Token, key: KeyVersion, scheme: UnwrapScheme, wrapped: bytes, options: KeyOptions
) -> bytes:
    """The session key ``wrapped`` carries, unwrapped in the token with ``key``.

    Raises FailedPrecondition when PKCS#1 v1.5 is not enabled for the key,
    MechanismUnsupported (FAILED_PRECONDITION) when the token lacks the scheme's mechanism,
    InvalidArgument (one message per key) for any malformed or rejected ciphertext. With
    PKCS#1 v1.5, a bad padding is never an error: see the module docstring.
    """
    _check_allowed(key, scheme, options)
    _check_ciphertext(key, wrapped)
    if scheme.implicit_rejection:
        return _unwrap_pkcs1v15(token, key, wrapped)
    secret = token.run(
        f"unwrapping with {scheme.mech.description}",
        lambda s: s.unwrap_secret(key.cka_id, scheme.mech, wrapped),
    )
    if not secret:
        raise invalid_ciphertext(key)
    return secret


def _select(ok: int, real: bytes, fallback: bytes) -> bytes:
    """``real`` if ok == 1 else ``fallback`` (both PKCS1V15_KEY_BYTES long), by arithmetic
    on equal-sized integers instead of a branch on ``ok``."""
    mask = -ok  # 0 or ...111 (all ones)
    r = int.from_bytes(b"\x01" + real, "big")  # the 0x01 keeps both ints the same size
    f = int.from_bytes(b"\x01" + fallback, "big")
    return ((r & mask) | (f & ~mask)).to_bytes(PKCS1V15_KEY_BYTES + 1, "big")[1:]


def _pkcs1v15_check(em: bytes, size: int) -> tuple[int, bytes]:
    """(1, message) if ``em`` is 00 02 PS 00 M with len(M) == 16 and PS free of zeros, else
    (0, garbage). Fixed positions, full-length scans and no early exit: the work does not
    depend on where the padding is wrong."""
    em = bytes(size - len(em)) + em  # some tokens strip leading zero bytes
    sep = size - PKCS1V15_KEY_BYTES - 1
    ok = (em[0] == 0) & (em[1] == 2) & (em.count(0, 2, sep) == 0) & (em[sep] == 0)
    return int(ok), em[sep + 1 :]


def _unwrap_pkcs1v15(token: Token, key: KeyVersion, wrapped: bytes) -> bytes:
    size = (key.bits + 7) // 8
    ir_input = _IR_CONTEXT + bytes.fromhex(key.fingerprint) + wrapped

    def run(s: Session) -> tuple[bytes, int, bytes]:
        # Always computed, valid padding or not, before the padding is looked at.
        fallback = s.implicit_rejection_mac(ir_input)[:PKCS1V15_KEY_BYTES]
        ok, message = _decrypt_pkcs1v15(s, id(token), key, wrapped, size)
        return fallback, ok, message

    # A token fault is never a rejected padding: it raises (UNAVAILABLE), and the call is
    # retried once after the session or module is repaired (Session._rejected_or_fault).
    fallback, ok, message = token.run("PKCS#1 v1.5 unwrap with implicit rejection", run)
    result = _select(ok, message, fallback)
    del message, fallback
    return result


def _decrypt_pkcs1v15(
    s: Session, token_id: int, key: KeyVersion, wrapped: bytes, size: int
) -> tuple[int, bytes]:
    """Raw RSA in the token and the padding check here, so the token's work is the same for
    every ciphertext; where the token refuses raw RSA, CKM_RSA_PKCS (whose error path is
    slower or faster than its success path: a residual timing signal, see docs/unwrap.md)."""
    if token_id not in _RAW_RSA_REFUSED:
        try:
            em = s.decrypt_or_none(key.cka_id, RSA_X_509, wrapped)
        except MechanismUnsupported:
            _RAW_RSA_REFUSED.add(token_id)
        else:
            return _pkcs1v15_check(em or bytes(size), size)
    plain = s.decrypt_or_none(key.cka_id, RSA_PKCS, wrapped)
    ok = plain is not None and len(plain) == PKCS1V15_KEY_BYTES
    return int(ok), plain if ok and plain is not None else bytes(PKCS1V15_KEY_BYTES)


def rewrap_session_key(
    token: Token,
    from_key: KeyVersion,
    from_scheme: UnwrapScheme,
    wrapped: bytes,
    to_key: KeyVersion,
    to_scheme: UnwrapScheme,
    from_options: KeyOptions,
) -> bytes:
    """Unwraps with ``from_key`` and encrypts the session key to ``to_key``'s public key with
    RSA-OAEP; the session key stays in this process's memory (dropped as soon as it is used;
    Python cannot guarantee the bytes are overwritten).

    Raises InvalidArgument for a PKCS#1 v1.5 target (OAEP only: v1.5 would create new data
    that needs the oracle-prone scheme) or a session key too long for the target key, and
    whatever ``unwrap_session_key`` raises.
    """
    if to_scheme.oaep_hash is None:
        raise InvalidArgument(
            "to_scheme must be RSA-OAEP (UNWRAP_SCHEME_RSA_OAEP_SHA256 or _SHA1): "
            "rewrapping never produces new PKCS#1 v1.5 ciphertexts"
        )
    algo = to_scheme.oaep_hash()
    capacity = (to_key.bits + 7) // 8 - 2 * algo.digest_size - 2
    secret = unwrap_session_key(token, from_key, from_scheme, wrapped, from_options)
    try:
        if len(secret) > capacity:
            raise InvalidArgument(
                f"the session key is too long for {to_scheme.name} to key {to_key.name!r} "
                f"version {to_key.version}"
            )
        return to_key.public_key.encrypt(
            secret, padding.OAEP(mgf=padding.MGF1(algo), algorithm=algo, label=None)
        )
    finally:
        del secret
