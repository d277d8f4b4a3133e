"""Capgo (capacitor-updater) encrypted bundle format, client side.

Everything a build agent needs to produce (and check) a Capgo "v2" encrypted live update,
byte-compatible with the published ``@capgo/cli`` 8.68.1 and ``@capgo/capacitor-updater``
8.51.23. The RSA *private* operation is not done here: it is injected through the
:class:`Sealer` protocol (the hsmsign daemon in production, :class:`FileKeySealer` for a
``.capgo_key_v2`` file and for tests). See ``CAPGO_FORMAT.md`` for the byte-level summary.

Full bundle (what the CLI's ``bundle encrypt`` does and the plugin checks):

* payload: the plain zip, AES-128-CBC, PKCS#7, no header/MAC/IV prefix;
* ``ivSessionKey`` = ``b64(iv) ":" b64(rsa_type1(session_key))``;
* signed checksum = ``rsa_type1(sha256(zip))`` (V3, hex, plugin >= 5.30/6.30/7.30, 8.x) or
  ``rsa_type1(b64decode(sha256_hex(zip)))`` (V2, base64, older plugins).
  ``rsa_type1`` is Node's ``privateEncrypt(RSA_PKCS1_PADDING)`` = PKCS#11 ``CKM_RSA_PKCS``.

Delta ("partial", manifest) updates, as read from the published packages:

* CLI (``bundle upload --delta`` with encryption): walks the web dir recursively, skips any
  path containing ``.DS_Store``, ``.git``, ``.gitignore``, ``node_modules``,
  ``package-lock.json``, ``tsconfig.json``, ``tsconfig.app.json``, ``tsconfig.spec.json``
  (plain substring match), skips empty files, refuses names with spaces and more than
  10,000 files. Each entry is ``{file: posix relative path, hash: sha256_hex(plain file)}``;
  with encryption ``hash`` is replaced by the signed checksum of that digest in the same V3
  or V2 format as the full bundle (one RSA operation per file).
* each file's content: brotli-compressed first if it is at least 8,192 bytes and the
  compressed form is more than 10 bytes smaller (the uploaded name then gets a ``.br``
  suffix; ``--disable-brotli`` turns that off), then AES-128-CBC/PKCS#7 encrypted with the
  *same* session key and IV as the full bundle.
* the manifest the CLI sends (and the device later receives, the server adding
  ``download_url``) is a JSON array of ``{"file_name": name[.br], "file_hash": signed
  checksum, ...}``; the server storage path is not part of the format.
* device (Android ``DownloadService``): ``file_hash`` must be present; with a public key and
  a valid ivSessionKey it is public-decrypted (same routine as the bundle checksum, 256
  bytes, hex if all-hex else base64) and hex-encoded; the downloaded file is AES-decrypted
  with the bundle's ivSessionKey, brotli-decompressed if the name ends in ``.br``, and its
  SHA-256 must equal that hex; the target name is ``file_name`` without ``.br``.

Python has no brotli in its standard library, so :func:`encrypt_delta` takes an optional
compressor; without one it behaves like the CLI with ``--disable-brotli``.

Security notes: the public key ships in every app and recovers the session key, so this
gives integrity and authenticity, not secrecy; delta files share one key and IV and CBC has
no MAC, so integrity rests on the signed SHA-256 checksums.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import os
import queue
import re
import secrets
import shutil
import stat
import tempfile
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmsign._files import atomic_output
from hsmsign.errors import HsmsignError, UsageError, VerificationError

__all__ = [
    "CAPGO_RSA_BITS",
    "BundleFormatError",
    "BundleVerificationError",
    "CapacitorConfigError",
    "CapgoError",
    "ChecksumFormat",
    "DeltaEntry",
    "DeltaResult",
    "FileKeySealer",
    "PublicKeyAware",
    "SealedBundle",
    "Sealer",
    "SessionMaterial",
    "VerifyResult",
    "check_bundle_zip",
    "checksum_format_for_plugin",
    "checksum_signing_input",
    "decode_signed_checksum",
    "encode_signed_checksum",
    "encrypt_bundle",
    "encrypt_delta",
    "format_iv_session_key",
    "key_id",
    "load_capgo_public_key",
    "make_bundle_zip",
    "new_session_material",
    "open_session",
    "parse_iv_session_key",
    "pkcs1_public_pem",
    "seal_bundle",
    "set_capacitor_public_key",
    "verify_bundle",
]

CAPGO_RSA_BITS: Final = 2048
RSA_BYTES: Final = CAPGO_RSA_BITS // 8
SESSION_KEY_BYTES: Final = 16
IV_BYTES: Final = 16
AES_BLOCK: Final = 16
CHUNK_BYTES: Final = 1 << 20
#: From this size up a small bundle is hashed on a second thread while it is encrypted.
PARALLEL_HASH_BYTES: Final = 256 << 10

PKCS1_PUBLIC_HEADER: Final = "-----BEGIN RSA PUBLIC KEY-----"
SPKI_PUBLIC_HEADER: Final = "-----BEGIN PUBLIC KEY-----"

# V3 (hex, raw digest) is accepted from these plugin versions on; 8.x and later always.
_V3_MINIMUM: Final[dict[int, tuple[int, int, int]]] = {
    5: (5, 30, 0),
    6: (6, 30, 0),
    7: (7, 30, 0),
}
# What the CLI leaves out of a delta manifest (substring match on the path).
DELTA_IGNORED: Final = (
    ".DS_Store",
    ".git",
    ".gitignore",
    "node_modules",
    "package-lock.json",
    "tsconfig.json",
    "tsconfig.app.json",
    "tsconfig.spec.json",
)
DELTA_MAX_FILES: Final = 10_000
BROTLI_MIN_BYTES: Final = 8192

_B64_PART = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_VERSION = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")

Progress = Callable[[int, int], None]


# --- errors -------------------------------------------------------------------------------


class CapgoError(HsmsignError):
    """Root of every error raised by this module (under hsmsign's one root)."""


class BundleFormatError(CapgoError, UsageError):
    """Input that is not in the shape Capgo expects (zip, key, ivSessionKey, sizes)."""


class BundleVerificationError(CapgoError, VerificationError):
    """A bundle failed one of the device's checks; the message names the check."""


class CapacitorConfigError(CapgoError, UsageError):
    """capacitor.config cannot be updated automatically."""


# --- keys -----------------------------------------------------------------------------------


def _pem_body(pem: str) -> str:
    return "".join(
        line.strip() for line in pem.strip().splitlines() if not line.startswith("-----")
    )


def key_id(public_pem: str) -> str:
    """Capgo key_id: the first 20 characters of the PKCS#1 public PEM's base64 body.

    Raises BundleFormatError if the PEM is not a PKCS#1 RSA public key.
    """
    if not public_pem.strip().startswith(PKCS1_PUBLIC_HEADER):
        raise BundleFormatError(
            f"key_id needs a PKCS#1 public PEM ({PKCS1_PUBLIC_HEADER}), which is what apps embed"
        )
    body = re.sub(r"\s", "", _pem_body(public_pem))
    if len(body) < 20:
        raise BundleFormatError("public key PEM body is too short to be an RSA key")
    return body[:20]


def pkcs1_public_pem(public_key: rsa.RSAPublicKey) -> str:
    """The public key as capacitor-updater embeds it (PKCS#1 PEM, no trailing newline)."""
    return (
        public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        .decode("ascii")
        .strip()
    )


def load_capgo_public_key(pem: str) -> rsa.RSAPublicKey:
    """Load a PKCS#1 RSA-2048 public PEM, refusing what the plugin would refuse.

    Raises BundleFormatError for SPKI PEMs, unparsable PEMs and keys that are not 2048-bit.
    """
    text = pem.strip()
    if text.startswith(SPKI_PUBLIC_HEADER):
        raise BundleFormatError(
            "this is an SPKI public key (-----BEGIN PUBLIC KEY-----); capacitor-updater requires "
            "the PKCS#1 form (-----BEGIN RSA PUBLIC KEY-----): the Android plugin throws at app "
            "start and iOS silently skips decryption. Export the key as PKCS#1."
        )
    if not text.startswith(PKCS1_PUBLIC_HEADER):
        raise BundleFormatError(f"not a PKCS#1 RSA public key PEM (expected {PKCS1_PUBLIC_HEADER})")
    try:
        key = serialization.load_pem_public_key(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as e:
        raise BundleFormatError(f"cannot parse the RSA public key PEM: {e}") from e
    if not isinstance(key, rsa.RSAPublicKey):
        raise BundleFormatError("the PEM does not hold an RSA public key")
    _require_2048(key.key_size)
    return key


def _require_2048(bits: int) -> None:
    if bits != CAPGO_RSA_BITS:
        raise BundleFormatError(
            f"Capgo requires RSA-{CAPGO_RSA_BITS} (got {bits}-bit): Android rejects checksum "
            "signatures that are not 256 bytes and iOS rejects other block sizes"
        )


# --- raw RSA PKCS#1 v1.5 type 1 (Node privateEncrypt / publicDecrypt, CKM_RSA_PKCS) ----------


def _type1_encode(data: bytes) -> int:
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


# --- checksum formats -------------------------------------------------------------------


class ChecksumFormat(enum.Enum):
    """How the bundle checksum is signed and encoded; no plugin version accepts both."""

    V3 = "v3"  # raw 32-byte digest signed, hex (512 chars)
    V2 = "v2"  # the 64-char hex string base64-decoded (48 bytes) signed, base64 (344 chars)


def _plugin_version(version: str) -> tuple[tuple[int, int, int], bool]:
    """(major, minor, patch) and whether it is a pre-release. Raises BundleFormatError."""
    m = _VERSION.fullmatch(version.strip())
    if m is None:
        raise BundleFormatError(
            f"cannot parse capacitor-updater version {version!r}; expected e.g. 8.51.23"
        )
    return (int(m[1]), int(m[2]), int(m[3])), m[4] is not None


def _at_least(version: str, minimum: dict[int, tuple[int, int, int]], from_major: int) -> bool:
    triple, prerelease = _plugin_version(version)
    if triple[0] >= from_major:
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
    return ChecksumFormat.V3 if _at_least(version, _V3_MINIMUM, 8) else ChecksumFormat.V2


#: The first updater of each major that applies delta (manifest) updates, as the Capgo CLI
#: 8.68.1 checks before it uploads one.
_DELTA_MINIMUM: Final = {5: (5, 10, 0), 6: (6, 25, 0), 7: (7, 0, 30)}


def plugin_supports_delta(version: str) -> bool:
    """Whether a @capgo/capacitor-updater version applies delta updates. Raises
    BundleFormatError for an unparsable version."""
    return _at_least(version, _DELTA_MINIMUM, 8)


def _require_digest(digest: bytes) -> None:
    if len(digest) != 32:
        raise BundleFormatError(f"a SHA-256 digest is 32 bytes, got {len(digest)}")


def checksum_signing_input(digest: bytes, fmt: ChecksumFormat) -> bytes:
    """The exact bytes the RSA operation signs for a bundle/file SHA-256 digest.

    Raises BundleFormatError if digest is not 32 bytes.
    """
    _require_digest(digest)
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
    if len(recovered) == 32:
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
    """Split ``IV_BASE64:SESSION_KEY_BASE64`` into (iv, sealed session key).

    Strict: exactly two non-empty canonical padded base64 parts. Sizes are not checked here
    (verification reports them). Raises BundleFormatError.
    """
    parts = s.strip().split(":")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise BundleFormatError(
            'ivSessionKey must be "IV_BASE64:SESSION_KEY_BASE64" with two non-empty parts'
        )
    return _strict_b64(parts[0], "IV part"), _strict_b64(parts[1], "session key part")


# --- the private operation (injected) -------------------------------------------------------


class Sealer(Protocol):
    """The RSA private-key operations a Capgo release needs (CKM_RSA_PKCS, RSA-2048)."""

    def seal_session_key(self, session_key: bytes) -> bytes:
        """Type-1 private-encrypt the 16-byte AES key; returns 256 bytes."""
        ...

    def sign_checksum(self, digest: bytes, fmt: ChecksumFormat) -> bytes:
        """Type-1 private-encrypt ``checksum_signing_input(digest, fmt)``; returns 256 bytes."""
        ...

    def sign_checksums(self, digests: Sequence[bytes], fmt: ChecksumFormat) -> list[bytes]:
        """Batch form of sign_checksum, in order (one round trip for a delta release)."""
        ...


@runtime_checkable
class PublicKeyAware(Protocol):
    """A sealer that can tell its PKCS#1 public PEM (enables key_id and self-checks)."""

    @property
    def public_pem(self) -> str: ...


class FileKeySealer:
    """Sealer backed by a local RSA-2048 private key (e.g. Capgo's ``.capgo_key_v2``).

    The type-1 operation is computed from the private numbers with RSA blinding, and every
    result is checked with the public exponent before it is returned. Python integers are
    not constant-time: use this for file-key compatibility and tests; production keys
    belong in the HSM.
    """

    def __init__(self, private_key: rsa.RSAPrivateKey) -> None:
        _require_2048(private_key.key_size)
        self._priv = private_key.private_numbers()
        self._pub = private_key.public_key()
        self._pem = pkcs1_public_pem(self._pub)

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
        m = _type1_encode(data)
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


# --- files ------------------------------------------------------------------------------------


def _refuse_same_file(src: Path, dst: Path) -> None:
    if Path(os.path.abspath(src)) == Path(os.path.abspath(dst)) or src.resolve() == dst.resolve():
        raise BundleFormatError(f"destination {dst} is the source file; refusing to overwrite it")
    if dst.exists() and os.path.samefile(src, dst):
        raise BundleFormatError(f"destination {dst} is the same file as {src} (a link)")


def new_session_material() -> tuple[bytes, bytes]:
    """A fresh (session_key, iv) pair, 16 bytes each, from the OS CSPRNG."""
    return secrets.token_bytes(SESSION_KEY_BYTES), secrets.token_bytes(IV_BYTES)


def _check_key_iv(session_key: bytes, iv: bytes) -> None:
    if len(session_key) != SESSION_KEY_BYTES:
        raise BundleFormatError(f"session key must be 16 bytes, got {len(session_key)}")
    if len(iv) != IV_BYTES:
        raise BundleFormatError(f"IV must be 16 bytes, got {len(iv)}")


class _BackgroundHasher:
    """SHA-256 over chunks in a second thread, overlapping the AES pass and the file I/O.

    hashlib releases the GIL on large buffers, so hashing chunk i runs while the main thread
    reads, encrypts and writes; buffers return to the free pool once hashed.
    """

    def __init__(self, buffers: int, size: int) -> None:
        self.digest = hashlib.sha256()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._size, self._spare = size, buffers  # allocated on demand: small files need few
        self._thread = threading.Thread(target=self._run, name="capgo-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buf, n = item
            try:
                if self._error is None:
                    self.digest.update(memoryview(buf)[:n])
            except BaseException as e:  # reported to the main thread in close()
                self._error = e
            self._free.put(buf)

    def take(self) -> bytearray:
        if self._spare and self._free.empty():
            self._spare -= 1
            return bytearray(self._size)
        return self._free.get()

    def give(self, buf: bytearray, n: int) -> None:
        self._todo.put((buf, n))

    def close(self) -> bytes:
        self._todo.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.digest.digest()


def _encrypt_stream(
    src: IO[bytes],
    dst: IO[bytes],
    session_key: bytes,
    iv: bytes,
    total: int,
    progress: Progress | None,
    regular: bool = False,
) -> bytes:
    """Hash and AES-128-CBC/PKCS#7-encrypt src into dst in one pass; returns sha256(plain)."""
    enc = Cipher(algorithms.AES(session_key), modes.CBC(iv)).encryptor()
    if regular and total <= 2 * CHUNK_BYTES:  # one read: no chunk pipeline needed
        plain = src.read()
        hashed: list[bytes] = []
        hash_thread = None
        if len(plain) >= PARALLEL_HASH_BYTES:
            # hashlib releases the GIL: SHA-256 runs beside AES (1 MB: 2.3 ms, not 2.75).
            hash_thread = threading.Thread(
                target=lambda: hashed.append(hashlib.sha256(plain).digest()), name="capgo-sha256"
            )
            hash_thread.start()
        try:
            pad = AES_BLOCK - len(plain) % AES_BLOCK
            dst.write(enc.update(plain))  # written as it is: no copy into one buffer
            dst.write(enc.update(bytes([pad]) * pad) + enc.finalize())
        finally:
            if hash_thread is not None:
                hash_thread.join()
        if progress is not None:
            progress(len(plain), total)
        return hashed[0] if hash_thread is not None else hashlib.sha256(plain).digest()
    outbuf = bytearray(CHUNK_BYTES + AES_BLOCK)
    outview = memoryview(outbuf)
    hasher = _BackgroundHasher(4, CHUNK_BYTES)
    done = 0
    try:
        while True:
            buf = hasher.take()
            n = src.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                break
            hasher.give(buf, n)  # read-only from here on: the hasher owns buf until returned
            k = enc.update_into(memoryview(buf)[:n], outbuf)
            dst.write(outview[:k])
            done += n
            if progress is not None:
                progress(done, total)
    finally:
        digest = hasher.close()
    pad = AES_BLOCK - done % AES_BLOCK
    dst.write(enc.update(bytes([pad]) * pad) + enc.finalize())
    return digest


def encrypt_bundle(
    src: Path,
    dst: Path,
    session_key: bytes,
    iv: bytes,
    progress: Progress | None = None,
) -> bytes:
    """AES-128-CBC/PKCS#7-encrypt src into dst; returns SHA-256 of the plain src.

    One streaming pass (constant memory); dst is written atomically and src is never
    overwritten. ``len(dst) == 16 * (len(src) // 16 + 1)``.
    Raises BundleFormatError (bad key/IV sizes, dst is src), OSError.
    """
    src, dst = Path(src), Path(dst)
    _check_key_iv(session_key, iv)
    _refuse_same_file(src, dst)
    with src.open("rb", buffering=0) as fin:
        st = os.fstat(fin.fileno())
        with atomic_output(dst) as fout:
            return _encrypt_stream(
                fin, fout, session_key, iv, st.st_size, progress, stat.S_ISREG(st.st_mode)
            )


def check_bundle_zip(path: Path) -> None:
    """Check that path is a zip the plugin can install (index.html at root or in one folder).

    Raises BundleFormatError.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleFormatError(f"{path} is not a readable zip file: {e}") from e
    _check_index_html(names, str(path))


def _check_index_html(names: Sequence[str], where: str) -> None:
    if "index.html" in names:
        return
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        (top,) = tops
        if f"{top}/index.html" in names:
            return
    raise BundleFormatError(
        f"{where}: index.html must be at the root of the bundle or inside its single top-level "
        "folder (capacitor-updater refuses other layouts)"
    )


# --- sealing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionMaterial:
    """One release's AES key and IV and their sealed form (shared by bundle and delta)."""

    session_key: bytes = field(repr=False)
    iv: bytes
    iv_session_key: str


def open_session(sealer: Sealer) -> SessionMaterial:
    """Fresh key and IV, the key sealed with one call to ``sealer.seal_session_key``.

    Raises BundleFormatError if the sealer returns a malformed block and
    BundleVerificationError if a PublicKeyAware sealer's block does not open to the key.
    """
    session_key, iv = new_session_material()
    sealed = sealer.seal_session_key(session_key)
    ivsk = format_iv_session_key(iv, sealed)
    if isinstance(sealer, PublicKeyAware):
        pub = load_capgo_public_key(sealer.public_pem)
        if rsa_public_decrypt(pub, sealed) != session_key:
            raise BundleVerificationError(
                "sealer self-check: the sealed session key does not decrypt to the session key "
                "with the sealer's public key (wrong mechanism? must be CKM_RSA_PKCS)"
            )
    return SessionMaterial(session_key, iv, ivsk)


@dataclass(frozen=True)
class SealedBundle:
    """What a Capgo upload of an externally stored encrypted bundle needs.

    ``iv_session_key`` and ``signed_checksum`` go to ``--iv-session-key`` and
    ``--encrypted-checksum``; ``checksum_hex`` is SHA-256 of the plain zip; ``key_id`` is
    set when the sealer exposes its public key. ``session`` is kept so delta files of the
    same release reuse the key and IV.
    """

    path: Path
    iv_session_key: str
    signed_checksum: str
    checksum_hex: str
    checksum_format: ChecksumFormat
    key_id: str | None
    session: SessionMaterial = field(repr=False)

    def upload_command(self, external_url: str = "<URL>") -> str:
        """The ``npx @capgo/cli bundle upload`` line for this bundle stored at external_url."""
        return (
            f"npx @capgo/cli bundle upload --external {external_url} "
            f'--iv-session-key "{self.iv_session_key}" '
            f'--encrypted-checksum "{self.signed_checksum}"'
        )


def _self_check_checksum(
    sealer: Sealer, signature: bytes, digest: bytes, fmt: ChecksumFormat
) -> None:
    if isinstance(sealer, PublicKeyAware):
        pub = load_capgo_public_key(sealer.public_pem)
        if rsa_public_decrypt(pub, signature) != checksum_signing_input(digest, fmt):
            raise BundleVerificationError(
                "sealer self-check: checksum signature does not decrypt to the checksum with "
                "the sealer's public key (wrong mechanism? must be CKM_RSA_PKCS over raw bytes)"
            )


def seal_bundle(
    src: Path,
    dst: Path,
    sealer: Sealer,
    fmt: ChecksumFormat = ChecksumFormat.V3,
    progress: Progress | None = None,
    session: SessionMaterial | None = None,
) -> SealedBundle:
    """Encrypt the zip src into dst and sign its checksum: a complete Capgo encrypted bundle.

    Two private operations (session key, checksum), or one if ``session`` is given.
    Raises BundleFormatError (not a bundle zip, dst is src), BundleVerificationError
    (sealer self-check), OSError, and whatever the sealer raises.
    """
    src, dst = Path(src), Path(dst)
    check_bundle_zip(src)
    if session is None:
        session = open_session(sealer)
    digest = encrypt_bundle(src, dst, session.session_key, session.iv, progress)
    try:
        signature = sealer.sign_checksum(digest, fmt)
        if len(signature) != RSA_BYTES:
            raise BundleFormatError(f"sealer returned a {len(signature)}-byte signature")
        _self_check_checksum(sealer, signature, digest, fmt)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise
    kid = key_id(sealer.public_pem) if isinstance(sealer, PublicKeyAware) else None
    return SealedBundle(
        path=dst,
        iv_session_key=session.iv_session_key,
        signed_checksum=encode_signed_checksum(signature, fmt),
        checksum_hex=digest.hex(),
        checksum_format=fmt,
        key_id=kid,
        session=session,
    )


# --- verification -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """A bundle that passed every device check."""

    checksum_hex: str
    checksum_format: ChecksumFormat
    key_id: str
    plain_size: int
    plain_path: Path | None


def _open_session_key(pub: rsa.RSAPublicKey, iv_session_key: str) -> tuple[bytes, bytes]:
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


def _open_checksum(
    pub: rsa.RSAPublicKey, signed_checksum: str, fmt: ChecksumFormat | None
) -> tuple[str, ChecksumFormat]:
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


def _decrypt_stream(
    src: IO[bytes], dst: IO[bytes] | None, session_key: bytes, iv: bytes, total: int
) -> tuple[bytes, int]:
    dec = Cipher(algorithms.AES(session_key), modes.CBC(iv)).decryptor()
    digest = hashlib.sha256()
    inbuf = bytearray(CHUNK_BYTES)
    outbuf = bytearray(CHUNK_BYTES + AES_BLOCK)
    inview, outview = memoryview(inbuf), memoryview(outbuf)
    held = b""  # the last plaintext block is held back until we know it carries the padding
    size = 0
    while True:
        n = src.readinto(inbuf)  # type: ignore[attr-defined]
        if not n:
            break
        k = dec.update_into(inview[:n], outbuf)
        if k == 0:
            continue
        out = outview[:k]
        emit = held + bytes(out[: k - AES_BLOCK]) if held else out[: k - AES_BLOCK]
        held = bytes(out[k - AES_BLOCK :])
        digest.update(emit)
        if dst is not None:
            dst.write(emit)
        size += len(emit)
    tail = held + dec.finalize()
    pad = tail[-1] if tail else 0
    if not tail or not 1 <= pad <= AES_BLOCK or tail[-pad:] != bytes([pad]) * pad:
        raise BundleVerificationError(
            "AES decryption failed: bad PKCS#7 padding (wrong session key or IV, or the file "
            "was modified)"
        )
    last = tail[:-pad]
    digest.update(last)
    if dst is not None:
        dst.write(last)
    return digest.digest(), size + len(last)


def verify_bundle(
    enc: Path,
    public_pem: str,
    iv_session_key: str,
    signed_checksum: str,
    plain_out: Path | None = None,
    fmt: ChecksumFormat | None = None,
) -> VerifyResult:
    """Check an encrypted bundle the way capacitor-updater does before installing it.

    Order as on Android: key part decrypts to 16 bytes, IV is 16 bytes, AES-CBC decrypt,
    checksum signature is 256 bytes and decrypts with the key, SHA-256 of the plain zip
    matches. ``fmt`` pins the checksum format of the target plugin (None accepts either and
    reports which). If plain_out is given the decrypted zip is written there atomically,
    only when every check passes.
    Raises BundleFormatError (key or ivSessionKey syntax) and BundleVerificationError naming
    the failed check.
    """
    enc = Path(enc)
    pub = load_capgo_public_key(public_pem)
    session_key, iv = _open_session_key(pub, iv_session_key)
    expected_hex, found_fmt = _open_checksum(pub, signed_checksum, fmt)
    size = enc.stat().st_size
    if size == 0 or size % AES_BLOCK:
        raise BundleVerificationError(
            f"AES decryption failed: encrypted size {size} is not a positive multiple of 16 "
            "(truncated or not encrypted)"
        )

    def check(actual: bytes) -> None:
        if actual.hex() != expected_hex:
            raise BundleVerificationError(
                "checksum mismatch: SHA-256 of the decrypted bundle is not the signed checksum "
                "(file tampered with, or the signature belongs to another bundle)"
            )

    with enc.open("rb", buffering=0) as fin:
        if plain_out is None:
            actual, plain_size = _decrypt_stream(fin, None, session_key, iv, size)
            check(actual)
        else:
            plain_out = Path(plain_out)
            _refuse_same_file(enc, plain_out)
            with atomic_output(plain_out) as fout:
                actual, plain_size = _decrypt_stream(fin, fout, session_key, iv, size)
                check(actual)
    return VerifyResult(expected_hex, found_fmt, key_id(public_pem), plain_size, plain_out)


# --- bundle zip and capacitor config -----------------------------------------------------


_ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)


def _bundle_root(web_dir: Path) -> Path:
    entries = [p for p in web_dir.iterdir()]
    if (web_dir / "index.html").is_file():
        return web_dir
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "index.html").is_file():
        return web_dir
    raise BundleFormatError(
        f"{web_dir}: index.html must be at the root of the web build or inside its single "
        "top-level folder (capacitor-updater refuses other layouts)"
    )


def _walk_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            if Path(dirpath, d).is_symlink():
                raise BundleFormatError(f"symlinked folder {Path(dirpath, d)} in the web build")
        for name in filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                raise BundleFormatError(f"symlink {p} in the web build; copy the file instead")
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def make_bundle_zip(web_dir: Path, out: Path) -> str:
    """Zip a web build deterministically (sorted, fixed timestamps) for Capgo.

    Returns the SHA-256 hex of the zip. Refuses a layout the plugin cannot install and
    writes out atomically. Raises BundleFormatError, OSError.
    """
    web_dir, out = Path(web_dir), Path(out)
    if not web_dir.is_dir():
        raise BundleFormatError(f"{web_dir} is not a folder")
    root = _bundle_root(web_dir)
    files = _walk_files(root)
    if out.resolve().is_relative_to(web_dir.resolve()):
        raise BundleFormatError(f"the zip {out} must not be inside the web build {web_dir}")
    digest = hashlib.sha256()
    with atomic_output(out) as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
            for p in files:
                info = zipfile.ZipInfo(p.relative_to(root).as_posix(), _ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                with p.open("rb") as src, z.open(info, "w") as dst:
                    while chunk := src.read(CHUNK_BYTES):
                        dst.write(chunk)
        f.flush()
        f.seek(0)
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _detect_indent(text: str) -> int | str:
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" \t")
        if stripped and stripped != line:
            ws = line[: len(line) - len(stripped)]
            return ws if "\t" in ws else len(ws)
    return 2


def set_capacitor_public_key(config_path: Path, pem: str) -> None:
    """Write pem into ``plugins.CapacitorUpdater.publicKey`` of a capacitor.config.json.

    Keeps the other keys, their order and the indentation; atomic. Raises
    CapacitorConfigError for .ts/.js configs (with the value to paste by hand) and invalid
    JSON, BundleFormatError for a key that is not PKCS#1 RSA-2048.
    """
    config_path = Path(config_path)
    load_capgo_public_key(pem)
    value = pem.strip()
    if config_path.suffix in (".ts", ".js", ".mjs", ".cjs"):
        raise CapacitorConfigError(
            f"{config_path} is code, not JSON: paste this by hand as "
            f"plugins.CapacitorUpdater.publicKey:\n{json.dumps(value)}"
        )
    text = config_path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CapacitorConfigError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CapacitorConfigError(f"{config_path}: top level must be a JSON object")
    plugins = data.setdefault("plugins", {})
    if not isinstance(plugins, dict):
        raise CapacitorConfigError(f"{config_path}: 'plugins' must be an object")
    updater = plugins.setdefault("CapacitorUpdater", {})
    if not isinstance(updater, dict):
        raise CapacitorConfigError(f"{config_path}: 'plugins.CapacitorUpdater' must be an object")
    updater["publicKey"] = value
    out = json.dumps(data, indent=_detect_indent(text), ensure_ascii=False)
    if text.endswith("\n"):
        out += "\n"
    mode = stat.S_IMODE(config_path.stat().st_mode)
    with atomic_output(config_path, mode) as f:
        f.write(out.encode("utf-8"))


# --- delta (manifest) updates ---------------------------------------------------------------


@dataclass(frozen=True)
class DeltaEntry:
    """One file of a delta release: ``file_name`` and ``file_hash`` go into the manifest."""

    file_name: str  # posix path relative to the web dir, plus ".br" if compressed
    file_hash: str  # signed checksum of the plain file's SHA-256 (V3 hex / V2 base64)
    checksum_hex: str  # SHA-256 of the plain (uncompressed, unencrypted) file
    encrypted_path: Path
    compressed: bool


@dataclass(frozen=True)
class DeltaResult:
    entries: list[DeltaEntry]
    iv_session_key: str
    checksum_format: ChecksumFormat

    def manifest(self) -> list[dict[str, str]]:
        """The manifest as the CLI sends it (the server adds download_url per entry)."""
        return [{"file_name": e.file_name, "file_hash": e.file_hash} for e in self.entries]

    def manifest_json(self) -> str:
        return json.dumps(self.manifest(), indent=2) + "\n"


def delta_files(web_dir: Path) -> list[tuple[str, Path]]:
    """The files the CLI puts in a delta manifest, as (posix relative path, path), sorted.

    Raises BundleFormatError for names with spaces or more than 10,000 files.
    """
    web_dir = Path(web_dir)
    chosen: list[tuple[str, Path]] = []
    for p in _walk_files(web_dir):
        rel = p.relative_to(web_dir).as_posix()
        if any(ignored in rel for ignored in DELTA_IGNORED) or p.stat().st_size == 0:
            continue
        if " " in rel:
            raise BundleFormatError(f"delta updates cannot carry file names with spaces: {rel}")
        chosen.append((rel, p))
    if len(chosen) > DELTA_MAX_FILES:
        raise BundleFormatError(
            f"{len(chosen)} files is more than the {DELTA_MAX_FILES} a delta update allows"
        )
    return chosen


def _encrypt_bytes(data: bytes, session_key: bytes, iv: bytes) -> bytes:
    enc = Cipher(algorithms.AES(session_key), modes.CBC(iv)).encryptor()
    pad = AES_BLOCK - len(data) % AES_BLOCK
    return enc.update(data) + enc.update(bytes([pad]) * pad) + enc.finalize()


def encrypt_delta(
    web_dir: Path,
    out_dir: Path,
    sealer: Sealer,
    fmt: ChecksumFormat,
    session: SessionMaterial,
    compress: Callable[[bytes], bytes] | None = None,
) -> DeltaResult:
    """Encrypt every file of a web build for a delta update, like ``bundle upload --delta``.

    Uses the release's ``session`` (the one the full bundle was sealed with: same key and
    IV) and ONE ``sealer.sign_checksums`` call for all files. ``compress`` is a brotli
    compressor; when given, files of 8,192 bytes or more that shrink by more than 10 bytes are
    stored compressed as ``name.br``. Encrypted files are written under out_dir (which must
    not exist; it is built beside and renamed into place). Raises BundleFormatError,
    BundleVerificationError (sealer self-check), OSError.
    """
    web_dir, out_dir = Path(web_dir), Path(out_dir)
    if out_dir.exists():
        raise BundleFormatError(f"{out_dir} already exists; give a new folder for the delta files")
    if out_dir.resolve().is_relative_to(web_dir.resolve()):
        raise BundleFormatError(f"{out_dir} must not be inside the web build {web_dir}")
    files = delta_files(web_dir)
    digests = []
    for _, p in files:
        h = hashlib.sha256()
        with p.open("rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                h.update(chunk)
        digests.append(h.digest())
    signatures = sealer.sign_checksums(digests, fmt)
    if len(signatures) != len(digests):
        raise BundleFormatError(
            f"sealer returned {len(signatures)} signatures for {len(digests)} checksums"
        )
    for sig, d in zip(signatures, digests, strict=True):
        if len(sig) != RSA_BYTES:
            raise BundleFormatError(f"sealer returned a {len(sig)}-byte signature")
        _self_check_checksum(sealer, sig, d, fmt)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    entries: list[DeltaEntry] = []
    try:
        for (rel, p), d, sig in zip(files, digests, signatures, strict=True):
            data = p.read_bytes()
            compressed = False
            if compress is not None and len(data) >= BROTLI_MIN_BYTES:
                packed = compress(data)
                if len(packed) < len(data) - 10:
                    data, compressed = packed, True
            name = rel + ".br" if compressed else rel
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_encrypt_bytes(data, session.session_key, session.iv))
            entries.append(
                DeltaEntry(
                    name, encode_signed_checksum(sig, fmt), d.hex(), out_dir / name, compressed
                )
            )
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DeltaResult(entries, session.iv_session_key, fmt)


def verify_delta_file(
    enc_file: Path,
    public_pem: str,
    iv_session_key: str,
    file_hash: str,
    decompress: Callable[[bytes], bytes] | None = None,
) -> bytes:
    """Check one delta file as the device does and return its plain content.

    Raises BundleVerificationError naming the failed check (BundleFormatError for syntax).
    """
    pub = load_capgo_public_key(public_pem)
    session_key, iv = _open_session_key(pub, iv_session_key)
    expected_hex, _ = _open_checksum(pub, file_hash, None)
    data = Path(enc_file).read_bytes()
    if not data or len(data) % AES_BLOCK:
        raise BundleVerificationError("AES decryption failed: size is not a multiple of 16")
    dec = Cipher(algorithms.AES(session_key), modes.CBC(iv)).decryptor()
    plain = dec.update(data) + dec.finalize()
    pad = plain[-1]
    if not 1 <= pad <= AES_BLOCK or plain[-pad:] != bytes([pad]) * pad:
        raise BundleVerificationError("AES decryption failed: bad PKCS#7 padding")
    plain = plain[:-pad]
    if Path(enc_file).name.endswith(".br"):
        if decompress is None:
            raise BundleVerificationError(f"{enc_file} is brotli-compressed; pass decompress")
        plain = decompress(plain)
    if hashlib.sha256(plain).hexdigest() != expected_hex:
        raise BundleVerificationError(
            "checksum mismatch: SHA-256 of the decrypted file is not the signed file_hash"
        )
    return plain
