"""The Capgo (capacitor-updater) wire format: pure functions, no I/O, no private key.

Shared with the daemon. Byte-compatible with the published ``@capgo/cli`` 8.68.1 and
``@capgo/capacitor-updater`` 8.51.23; ``CAPGO_FORMAT.md`` has the byte-level summary.

* ``ivSessionKey`` = ``b64(iv) ":" b64(rsa_type1(session_key))``;
* signed checksum = ``rsa_type1(sha256(zip))`` (V3, hex, plugin >= 5.30/6.30/7.30, 8.x) or
  ``rsa_type1(b64decode(sha256_hex(zip)))`` (V2, base64, older plugins).
  ``rsa_type1`` is Node's ``privateEncrypt(RSA_PKCS1_PADDING)`` = PKCS#11 ``CKM_RSA_PKCS``;
  the device undoes it with the public key (:func:`rsa_public_decrypt`).
* keys: RSA-2048 only, embedded in the app as a PKCS#1 PEM; the key_id is the first 20
  characters of that PEM's body.

Security notes: the public key ships in every app and recovers the session key, so this
gives integrity and authenticity, not secrecy; CBC has no MAC, so integrity rests on the
signed SHA-256 checksums.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import keyformats, names
from hsmsign.errors import Error, UsageError, VerificationError
from hsmsign.v1 import hsmsign_pb2 as pb

CAPGO_RSA_BITS: Final = 2048
RSA_BYTES: Final = CAPGO_RSA_BITS // 8
SESSION_KEY_BYTES: Final = 16
IV_BYTES: Final = 16
AES_BLOCK: Final = 16
DIGEST_BYTES: Final = 32

#: V3 (hex, raw digest) is accepted from these plugin versions on; 8.x and later always.
_V3_MINIMUM: Final[dict[int, tuple[int, int, int]]] = {5: (5, 30, 0), 6: (6, 30, 0), 7: (7, 30, 0)}
#: The first updater of each major that applies delta (manifest) updates, as the Capgo CLI
#: 8.68.1 checks before it uploads one; 8.x and later always.
_DELTA_MINIMUM: Final[dict[int, tuple[int, int, int]]] = {
    5: (5, 10, 0),
    6: (6, 25, 0),
    7: (7, 0, 30),
}
_ALWAYS_FROM_MAJOR: Final = 8

_B64_PART = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")


# --- errors -------------------------------------------------------------------------------


class CapgoError(Error):
    """Root of the Capgo errors (under hsmsign's one client root)."""


class BundleFormatError(CapgoError, UsageError):
    """Input that is not in the shape Capgo expects (zip, key, ivSessionKey, sizes)."""


class BundleVerificationError(CapgoError, VerificationError):
    """A bundle failed one of the device's checks; the message names the check."""


# --- keys ---------------------------------------------------------------------------------


def require_rsa_2048(bits: int, what: str = "the key") -> None:
    """The one RSA-2048 rule. Raises BundleFormatError naming ``what`` and its size."""
    if bits != CAPGO_RSA_BITS:
        raise BundleFormatError(
            f"{what} is RSA-{bits}; Capgo requires RSA-{CAPGO_RSA_BITS}: Android rejects "
            "checksum signatures that are not 256 bytes and iOS rejects other block sizes"
        )


def key_id(public_pem: str) -> str:
    """Capgo key_id of a PKCS#1 public PEM. Raises BundleFormatError for other text."""
    try:
        return keyformats.capgo_key_id_of_pem(public_pem)
    except ValueError as e:
        raise BundleFormatError(str(e)) from None


def load_capgo_public_key(pem: str) -> rsa.RSAPublicKey:
    """Load a PKCS#1 RSA-2048 public PEM, refusing what the plugin would refuse.

    Raises BundleFormatError for SPKI PEMs, unparsable PEMs and keys that are not 2048-bit.
    """
    text = pem.strip()
    if text.startswith(keyformats.SPKI_PUBLIC_HEADER):
        raise BundleFormatError(
            "this is an SPKI public key (-----BEGIN PUBLIC KEY-----); capacitor-updater requires "
            "the PKCS#1 form (-----BEGIN RSA PUBLIC KEY-----): the Android plugin throws at app "
            "start and iOS silently skips decryption. Export the key as PKCS#1."
        )
    if not text.startswith(keyformats.PKCS1_PUBLIC_HEADER):
        raise BundleFormatError(
            f"not a PKCS#1 RSA public key PEM (expected {keyformats.PKCS1_PUBLIC_HEADER})"
        )
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise BundleFormatError(f"cannot parse the RSA public key PEM: {e}") from e
    if not isinstance(key, rsa.RSAPublicKey):
        raise BundleFormatError("the PEM does not hold an RSA public key")
    require_rsa_2048(key.key_size)
    return key


# --- raw RSA PKCS#1 v1.5 type 1 (Node privateEncrypt / publicDecrypt, CKM_RSA_PKCS) --------


def type1_block(data: bytes) -> int:
    """``00 01 FF.. 00 data`` as the integer an RSA-2048 private operation raises.

    Raises BundleFormatError if data does not fit (more than 245 bytes).
    """
    # 11 = 00 01 + at least 8 FF + 00
    if len(data) > RSA_BYTES - 11:
        raise BundleFormatError(f"{len(data)} bytes is too long for an RSA-2048 type-1 block")
    em = b"\x00\x01" + b"\xff" * (RSA_BYTES - 3 - len(data)) + b"\x00" + data
    return int.from_bytes(em, "big")


def rsa_public_decrypt(public_key: rsa.RSAPublicKey, block: bytes) -> bytes:
    """Recover what a type-1 private-encrypt sealed (Node's publicDecrypt, PKCS#1 padding).

    Raises BundleVerificationError if the block is not 256 bytes or its padding is not a
    valid type-1 block under this key (wrong key, or not made with CKM_RSA_PKCS).
    """
    if len(block) != RSA_BYTES:
        raise BundleVerificationError(
            f"RSA block is {len(block)} bytes, expected {RSA_BYTES} for RSA-{CAPGO_RSA_BITS}"
        )
    numbers = public_key.public_numbers()
    c = int.from_bytes(block, "big")
    if c >= numbers.n:
        raise BundleVerificationError("RSA block is not smaller than the modulus of this key")
    em = pow(c, numbers.e, numbers.n).to_bytes(RSA_BYTES, "big")
    sep = em.find(b"\x00", 2)
    if em[:2] != b"\x00\x01" or sep < 10 or em[2:sep].strip(b"\xff"):
        raise BundleVerificationError(
            "RSA block is not a PKCS#1 type-1 block under this public key (wrong key?)"
        )
    return em[sep + 1 :]


# --- checksum formats -----------------------------------------------------------------------


class ChecksumFormat(enum.Enum):
    """How the bundle checksum is signed and encoded; no plugin version accepts both.

    The values are the names in :data:`hsmsign.names.CHECKSUM_FORMATS`.
    """

    V3 = "v3"  # raw 32-byte digest signed, hex (512 chars)
    V2 = "v2"  # the 64-char hex string base64-decoded (48 bytes) signed, base64 (344 chars)

    @property
    def pb(self) -> pb.ChecksumFormat.ValueType:
        return names.by_name(names.CHECKSUM_FORMATS, self.value, "checksum format").pb

    @classmethod
    def from_name(cls, name: str) -> ChecksumFormat:
        """Raises BundleFormatError listing the allowed names."""
        try:
            return cls(names.by_name(names.CHECKSUM_FORMATS, name, "checksum format").name)
        except names.UnknownName as e:
            raise BundleFormatError(str(e)) from None

    @classmethod
    def from_pb(cls, value: int) -> ChecksumFormat | None:
        """The format of a protobuf enum value; None for UNSPECIFIED or unknown values."""
        row = names.by_pb(names.CHECKSUM_FORMATS, value)
        return cls(row.name) if row is not None else None


def _plugin_version(version: str) -> tuple[tuple[int, int, int], bool]:
    """(major, minor, patch) and whether it is a pre-release. Raises BundleFormatError."""
    m = _VERSION.fullmatch(version.strip())
    if m is None:
        raise BundleFormatError(
            f"cannot parse capacitor-updater version {version!r}; expected e.g. 8.51.23"
        )
    return (int(m[1]), int(m[2]), int(m[3])), m[4] is not None


def _at_least(version: str, minimum: dict[int, tuple[int, int, int]]) -> bool:
    triple, prerelease = _plugin_version(version)
    if triple[0] >= _ALWAYS_FROM_MAJOR:
        return True
    floor = minimum.get(triple[0])
    if floor is None:
        return False
    return triple > floor or (triple == floor and not prerelease)


def checksum_format_for_plugin(version: str) -> ChecksumFormat:
    """The checksum format a given @capgo/capacitor-updater version accepts.

    Raises BundleFormatError for a version that is not MAJOR.MINOR.PATCH (optional leading v,
    pre-release and build suffixes allowed; a pre-release sorts before its release).
    """
    return ChecksumFormat.V3 if _at_least(version, _V3_MINIMUM) else ChecksumFormat.V2


def plugin_supports_delta(version: str) -> bool:
    """Whether a @capgo/capacitor-updater version applies delta updates. Raises
    BundleFormatError for an unparsable version."""
    return _at_least(version, _DELTA_MINIMUM)


def checksum_signing_input(digest: bytes, fmt: ChecksumFormat) -> bytes:
    """The exact bytes the RSA operation signs for a bundle/file SHA-256 digest.

    Raises BundleFormatError if digest is not 32 bytes.
    """
    if len(digest) != DIGEST_BYTES:
        raise BundleFormatError(f"a SHA-256 digest is 32 bytes, got {len(digest)}")
    if fmt is ChecksumFormat.V3:
        return bytes(digest)
    # The legacy CLI read the hex string as if it were base64: 64 chars -> 48 bytes.
    return base64.b64decode(digest.hex())


def encode_signed_checksum(signature: bytes, fmt: ChecksumFormat) -> str:
    """Text form of a checksum signature: V3 hex (512 chars), V2 base64 (344 chars).

    Raises BundleFormatError if the signature is not 256 bytes.
    """
    if len(signature) != RSA_BYTES:
        raise BundleFormatError(f"checksum signature is {len(signature)} bytes, expected 256")
    if fmt is ChecksumFormat.V3:
        return signature.hex()
    return base64.b64encode(signature).decode("ascii")


def decode_signed_checksum(text: str) -> bytes:
    """Decode a signed checksum as the device does: hex if all hex digits, else base64.

    Raises BundleVerificationError if it does not decode to exactly 256 bytes.
    """
    s = text.strip()
    try:
        raw = bytes.fromhex(s) if _HEX.fullmatch(s) else base64.b64decode(s, validate=True)
    except (ValueError, binascii.Error) as e:
        raise BundleVerificationError(f"checksum signature is neither hex nor base64: {e}") from e
    if len(raw) != RSA_BYTES:
        raise BundleVerificationError(
            f"checksum signature is {len(raw)} bytes, expected {RSA_BYTES}: the bundle was not "
            "signed with an RSA-2048 key (uploaded without encryption?)"
        )
    return raw


def _checksum_hex_from_recovered(recovered: bytes) -> tuple[str, ChecksumFormat]:
    if len(recovered) == DIGEST_BYTES:
        return recovered.hex(), ChecksumFormat.V3
    if len(recovered) == 48:
        return base64.b64encode(recovered).decode("ascii").lower(), ChecksumFormat.V2
    raise BundleVerificationError(
        f"checksum signature decrypts to {len(recovered)} bytes, neither a V3 SHA-256 (32) "
        "nor a V2 checksum (48)"
    )


# --- ivSessionKey -----------------------------------------------------------------------------


def format_iv_session_key(iv: bytes, sealed_session_key: bytes) -> str:
    """``b64(iv):b64(sealed key)``, canonical padded base64 (369 chars for RSA-2048).

    Raises BundleFormatError if iv is not 16 bytes or the sealed key is not 256 bytes.
    """
    if len(iv) != IV_BYTES:
        raise BundleFormatError(f"IV must be {IV_BYTES} bytes, got {len(iv)}")
    if len(sealed_session_key) != RSA_BYTES:
        raise BundleFormatError(
            f"sealed session key must be {RSA_BYTES} bytes, got {len(sealed_session_key)}"
        )
    b64 = base64.b64encode
    return f"{b64(iv).decode('ascii')}:{b64(sealed_session_key).decode('ascii')}"


def _strict_b64(part: str, what: str) -> bytes:
    if not _B64_PART.fullmatch(part):
        raise BundleFormatError(f"ivSessionKey {what} is not canonical base64")
    try:
        raw = base64.b64decode(part, validate=True)
    except binascii.Error as e:
        raise BundleFormatError(f"ivSessionKey {what} is not valid base64: {e}") from e
    if not raw or base64.b64encode(raw).decode("ascii") != part:
        raise BundleFormatError(f"ivSessionKey {what} is not canonical padded base64")
    return raw


def parse_iv_session_key(s: str) -> tuple[bytes, bytes]:
    """Split ``IV_BASE64:SESSION_KEY_BASE64`` into (iv, sealed or wrapped session key).

    The one parser, for v2 (sealed) and v1 (OAEP-wrapped) fields alike. Strict: exactly two
    non-empty canonical padded base64 parts. Sizes are not checked here (verification reports
    them). Raises BundleFormatError.
    """
    parts = s.strip().split(":")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise BundleFormatError(
            "ivSessionKey must be two non-empty base64 parts joined by ':' (IV:WRAPPED_KEY)"
        )
    return _strict_b64(parts[0], "IV part"), _strict_b64(parts[1], "session key part")


# --- the device's checks ------------------------------------------------------------------------


def open_session_key(pub: rsa.RSAPublicKey, iv_session_key: str) -> tuple[bytes, bytes]:
    """(session key, iv) recovered from an ivSessionKey with the public key, as the device does.

    Raises BundleFormatError (syntax) and BundleVerificationError naming the failed check.
    """
    iv, sealed = parse_iv_session_key(iv_session_key)
    try:
        session_key = rsa_public_decrypt(pub, sealed)
    except BundleVerificationError as e:
        raise BundleVerificationError(
            f"session key check failed: it does not decrypt with this public key ({e})"
        ) from e
    if len(session_key) != SESSION_KEY_BYTES:
        raise BundleVerificationError(
            f"session key check failed: decrypted to {len(session_key)} bytes, expected 16"
        )
    if len(iv) != IV_BYTES:
        raise BundleVerificationError(f"IV check failed: IV is {len(iv)} bytes, expected 16")
    return session_key, iv


def open_checksum(
    pub: rsa.RSAPublicKey, signed_checksum: str, fmt: ChecksumFormat | None
) -> tuple[str, ChecksumFormat]:
    """(SHA-256 hex, format) a signed checksum carries; ``fmt`` pins the expected format.

    Raises BundleVerificationError naming the failed check.
    """
    raw = decode_signed_checksum(signed_checksum)
    try:
        recovered = rsa_public_decrypt(pub, raw)
    except BundleVerificationError as e:
        raise BundleVerificationError(
            f"checksum signature check failed: not decryptable with this public key ({e})"
        ) from e
    expected, found = _checksum_hex_from_recovered(recovered)
    if fmt is not None and found is not fmt:
        raise BundleVerificationError(
            f"checksum format check failed: the signature is {found.value.upper()} but the "
            f"target plugin expects {fmt.value.upper()}"
        )
    return expected, found
