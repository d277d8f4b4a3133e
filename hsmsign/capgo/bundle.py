"""Seal and verify one Capgo "v2" encrypted bundle (the full zip of a live update).

* payload: the plain zip, AES-128-CBC, PKCS#7, no header/MAC/IV prefix;
* the RSA *private* operation is not done here: it is injected through :class:`Sealer`
  (the hsmsign daemon in production, see :mod:`hsmsign.capgo.daemon`).

Output files are committed only after every step (encryption, signing, self-checks)
succeeded; a file already at the output path survives any failure untouched.
"""

from __future__ import annotations

import os
import secrets
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from hsmsign._internal import aescbc
from hsmsign._internal.files import atomic_output
from hsmsign._internal.progress import Progress
from hsmsign.capgo.format import (
    IV_BYTES,
    RSA_BYTES,
    SESSION_KEY_BYTES,
    BundleFormatError,
    BundleVerificationError,
    ChecksumFormat,
    checksum_signing_input,
    decode_signed_checksum,
    encode_signed_checksum,
    format_iv_session_key,
    key_id,
    load_capgo_public_key,
    open_checksum,
    open_session_key,
    parse_iv_session_key,
    rsa_public_decrypt,
)

# --- the private operation (injected) -------------------------------------------------------


@runtime_checkable
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


@dataclass(frozen=True)
class BundleSeal:
    """The two upload fields of a bundle, as text, and the Capgo key_id of the key."""

    iv_session_key: str
    signed_checksum: str
    key_id: str


@runtime_checkable
class OneCallSealer(Protocol):
    """A sealer that seals the session key and signs the checksum in one operation (the
    daemon's SealBundle), returning the fields already encoded."""

    def seal_bundle(
        self, session_key: bytes, iv: bytes, digest: bytes, fmt: ChecksumFormat
    ) -> BundleSeal: ...


@runtime_checkable
class PublicKeyAware(Protocol):
    """A sealer that tells its PKCS#1 public PEM: its results are checked against it."""

    @property
    def public_pem(self) -> str: ...


def _self_check_session_key(sealer: object, sealed: bytes, session_key: bytes) -> None:
    if isinstance(sealer, PublicKeyAware):
        pub = load_capgo_public_key(sealer.public_pem)
        if rsa_public_decrypt(pub, sealed) != session_key:
            raise BundleVerificationError(
                "sealer self-check: the sealed session key does not decrypt to the session key "
                "with the sealer's public key (wrong mechanism? must be CKM_RSA_PKCS)"
            )


def self_check_checksum(
    sealer: object, signature: bytes, digest: bytes, fmt: ChecksumFormat
) -> None:
    """For a PublicKeyAware sealer: the signature opens to the checksum. Raises
    BundleFormatError (not 256 bytes) and BundleVerificationError."""
    if len(signature) != RSA_BYTES:
        raise BundleFormatError(f"sealer returned a {len(signature)}-byte signature")
    if isinstance(sealer, PublicKeyAware):
        pub = load_capgo_public_key(sealer.public_pem)
        if rsa_public_decrypt(pub, signature) != checksum_signing_input(digest, fmt):
            raise BundleVerificationError(
                "sealer self-check: checksum signature does not decrypt to the checksum with "
                "the sealer's public key (wrong mechanism? must be CKM_RSA_PKCS over raw bytes)"
            )


# --- session material -------------------------------------------------------------------------


def new_session_material() -> tuple[bytes, bytes]:
    """A fresh (session_key, iv) pair, 16 bytes each, from the OS CSPRNG."""
    return secrets.token_bytes(SESSION_KEY_BYTES), secrets.token_bytes(IV_BYTES)


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
    _self_check_session_key(sealer, sealed, session_key)
    return SessionMaterial(session_key, iv, ivsk)


def _check_key_iv(session_key: bytes, iv: bytes) -> None:
    if len(session_key) != SESSION_KEY_BYTES:
        raise BundleFormatError(f"session key must be 16 bytes, got {len(session_key)}")
    if len(iv) != IV_BYTES:
        raise BundleFormatError(f"IV must be 16 bytes, got {len(iv)}")


def refuse_same_file(src: Path, dst: Path) -> None:
    """Raises BundleFormatError if writing dst would overwrite src (same path or a link)."""
    if Path(os.path.abspath(src)) == Path(os.path.abspath(dst)) or src.resolve() == dst.resolve():
        raise BundleFormatError(f"destination {dst} is the source file; refusing to overwrite it")
    if dst.exists() and os.path.samefile(src, dst):
        raise BundleFormatError(f"destination {dst} is the same file as {src} (a link)")


# --- the bundle zip ----------------------------------------------------------------------------


def check_index_html(names: Sequence[str], where: str) -> None:
    """Raises BundleFormatError unless index.html is at the root or in the one top folder."""
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


def check_bundle_zip(path: Path) -> None:
    """Check that path is a zip the plugin can install (index.html at root or in one folder).

    Raises BundleFormatError.
    """
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError) as e:
        raise BundleFormatError(f"{path} is not a readable zip file: {e}") from e
    check_index_html(names, str(path))


# --- sealing ----------------------------------------------------------------------------------


def _encrypt_into(
    src: Path, out: IO[bytes], session_key: bytes, iv: bytes, progress: Progress | None
) -> bytes:
    with src.open("rb", buffering=0) as fin:
        st = os.fstat(fin.fileno())
        return aescbc.encrypt_stream(
            fin, out, session_key, iv, st.st_size, progress, stat.S_ISREG(st.st_mode)
        )


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
    Raises BundleFormatError (bad key/IV sizes, dst is src), UsageError (no such folder),
    OSError.
    """
    src, dst = Path(src), Path(dst)
    _check_key_iv(session_key, iv)
    refuse_same_file(src, dst)
    with atomic_output(dst) as fout:
        return _encrypt_into(src, fout, session_key, iv, progress)


@dataclass(frozen=True)
class SealedBundle:
    """What a Capgo upload of an externally stored encrypted bundle needs.

    ``iv_session_key`` and ``signed_checksum`` go to ``--iv-session-key`` and
    ``--encrypted-checksum``; ``checksum_hex`` is SHA-256 of the plain zip; ``key_id`` is
    set when the sealer tells it (the daemon) or exposes its public key. ``session`` is kept
    so delta files of the same release reuse the key and IV.
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


def _seal_fields(
    sealer: Sealer | OneCallSealer,
    session_key: bytes,
    iv: bytes,
    digest: bytes,
    fmt: ChecksumFormat,
) -> BundleSeal:
    """The upload fields for an encrypted bundle: one call to a OneCallSealer, else two."""
    if isinstance(sealer, OneCallSealer):
        seal = sealer.seal_bundle(session_key, iv, digest, fmt)
        if isinstance(sealer, PublicKeyAware):
            got_iv, sealed = parse_iv_session_key(seal.iv_session_key)
            if got_iv != iv:
                raise BundleVerificationError("sealer self-check: the IV came back changed")
            _self_check_session_key(sealer, sealed, session_key)
            self_check_checksum(sealer, decode_signed_checksum(seal.signed_checksum), digest, fmt)
        return seal
    sealed = sealer.seal_session_key(session_key)
    ivsk = format_iv_session_key(iv, sealed)
    _self_check_session_key(sealer, sealed, session_key)
    signature = sealer.sign_checksum(digest, fmt)
    self_check_checksum(sealer, signature, digest, fmt)
    kid = key_id(sealer.public_pem) if isinstance(sealer, PublicKeyAware) else ""
    return BundleSeal(ivsk, encode_signed_checksum(signature, fmt), kid)


def seal_bundle(
    src: Path,
    dst: Path,
    sealer: Sealer | OneCallSealer,
    fmt: ChecksumFormat = ChecksumFormat.V3,
    progress: Progress | None = None,
    session: SessionMaterial | None = None,
) -> SealedBundle:
    """Encrypt the zip src into dst and sign its checksum: a complete Capgo encrypted bundle.

    dst appears only after the checksum is signed and every self-check passed; a file
    already at dst is left untouched by any failure. Without ``session`` a fresh key and IV
    are made and sealed together with the checksum (one call to a OneCallSealer); with it,
    only the checksum is signed (the session was sealed before, e.g. by open_session).
    Raises BundleFormatError (not a bundle zip, dst is src), BundleVerificationError
    (sealer self-check), UsageError (no such folder), OSError, and whatever the sealer raises.
    """
    src, dst = Path(src), Path(dst)
    check_bundle_zip(src)
    refuse_same_file(src, dst)
    with atomic_output(dst) as out:
        if session is None:
            session_key, iv = new_session_material()
            digest = _encrypt_into(src, out, session_key, iv, progress)
            seal = _seal_fields(sealer, session_key, iv, digest, fmt)
            session = SessionMaterial(session_key, iv, seal.iv_session_key)
            signed, kid = seal.signed_checksum, seal.key_id
        else:
            _check_key_iv(session.session_key, session.iv)
            digest = _encrypt_into(src, out, session.session_key, session.iv, progress)
            if not isinstance(sealer, Sealer):
                raise BundleFormatError(
                    "this sealer seals whole bundles only; it cannot reuse a session"
                )
            signature = sealer.sign_checksum(digest, fmt)
            self_check_checksum(sealer, signature, digest, fmt)
            signed = encode_signed_checksum(signature, fmt)
            kid = key_id(sealer.public_pem) if isinstance(sealer, PublicKeyAware) else ""
    return SealedBundle(
        path=dst,
        iv_session_key=session.iv_session_key,
        signed_checksum=signed,
        checksum_hex=digest.hex(),
        checksum_format=fmt,
        key_id=kid or None,
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
    Raises BundleFormatError (key or ivSessionKey syntax, unreadable file),
    BundleVerificationError naming the failed check, UsageError (no such output folder).
    """
    enc = Path(enc)
    pub = load_capgo_public_key(public_pem)
    session_key, iv = open_session_key(pub, iv_session_key)
    expected_hex, found_fmt = open_checksum(pub, signed_checksum, fmt)
    try:
        size = enc.stat().st_size
    except OSError as e:
        raise BundleFormatError(f"cannot read {enc}: {e.strerror}") from None
    if size == 0 or size % aescbc.AES_BLOCK:
        raise BundleVerificationError(
            f"AES decryption failed: encrypted size {size} is not a positive multiple of 16 "
            "(truncated or not encrypted)"
        )

    def decrypt(fin: IO[bytes], fout: IO[bytes] | None) -> int:
        try:
            actual, plain_size = aescbc.decrypt_stream(fin, fout, session_key, iv, size)
        except aescbc.BadPadding:
            raise BundleVerificationError(
                "AES decryption failed: bad PKCS#7 padding (wrong session key or IV, or the "
                "file was modified)"
            ) from None
        if actual.hex() != expected_hex:
            raise BundleVerificationError(
                "checksum mismatch: SHA-256 of the decrypted bundle is not the signed checksum "
                "(file tampered with, or the signature belongs to another bundle)"
            )
        return plain_size

    with enc.open("rb", buffering=0) as fin:
        if plain_out is None:
            plain_size = decrypt(fin, None)
        else:
            plain_out = Path(plain_out)
            refuse_same_file(enc, plain_out)
            with atomic_output(plain_out) as fout:
                plain_size = decrypt(fin, fout)
    return VerifyResult(expected_hex, found_fmt, key_id(public_pem), plain_size, plain_out)
