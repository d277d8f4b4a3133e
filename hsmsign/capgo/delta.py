"""Delta ("partial", manifest) updates: every file of a web build encrypted on its own.

As read from the published packages:

* CLI (``bundle upload --delta`` with encryption): walks the web dir recursively, skips any
  path containing one of :data:`DELTA_IGNORED` (plain substring match), skips empty files,
  refuses names with spaces and more than 10,000 files. Each entry is ``{file: posix
  relative path, hash: sha256_hex(plain file)}``; with encryption ``hash`` is replaced by the
  signed checksum of that digest in the same V3 or V2 format as the full bundle.
* each file's content: brotli-compressed first if it is at least 8,192 bytes and the
  compressed form is more than 10 bytes smaller (the uploaded name then gets a ``.br``
  suffix), then AES-128-CBC/PKCS#7 encrypted with the *same* session key and IV as the
  full bundle.
* the manifest is a JSON array of ``{"file_name": name[.br], "file_hash": signed checksum}``
  (the server adds ``download_url``).
* device (Android ``DownloadService``): ``file_hash`` is public-decrypted like the bundle
  checksum; the file is AES-decrypted with the bundle's ivSessionKey, brotli-decompressed if
  the name ends in ``.br``, and its SHA-256 must equal the recovered digest.

Python has no brotli in its standard library, so :func:`encrypt_delta` takes an optional
compressor; without one it behaves like the CLI with ``--disable-brotli``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hsmsign._internal import aescbc
from hsmsign._internal.files import atomic_directory
from hsmsign.capgo.bundle import Sealer, SessionMaterial, self_check_checksum
from hsmsign.capgo.format import (
    BundleFormatError,
    BundleVerificationError,
    ChecksumFormat,
    encode_signed_checksum,
    load_capgo_public_key,
    open_checksum,
    open_session_key,
)

#: What the CLI leaves out of a delta manifest (substring match on the path).
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
#: A compressed file is kept only if it is more than this many bytes smaller.
BROTLI_MIN_GAIN: Final = 10


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


def walk_files(root: Path) -> list[Path]:
    """Every file under root, sorted by posix relative path. Raises BundleFormatError for
    symlinks (copy the file instead), OSError."""
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


def delta_files(web_dir: Path) -> list[tuple[str, Path]]:
    """The files the CLI puts in a delta manifest, as (posix relative path, path), sorted.

    Raises BundleFormatError for names with spaces or more than 10,000 files.
    """
    web_dir = Path(web_dir)
    chosen: list[tuple[str, Path]] = []
    for p in walk_files(web_dir):
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


def _sha256_file(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(aescbc.CHUNK_BYTES):
            h.update(chunk)
    return h.digest()


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
    digests = [_sha256_file(p) for _, p in files]
    signatures = sealer.sign_checksums(digests, fmt)
    if len(signatures) != len(digests):
        raise BundleFormatError(
            f"sealer returned {len(signatures)} signatures for {len(digests)} checksums"
        )
    for sig, d in zip(signatures, digests, strict=True):
        self_check_checksum(sealer, sig, d, fmt)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    entries: list[DeltaEntry] = []
    with atomic_directory(out_dir) as staging:
        for (rel, p), d, sig in zip(files, digests, signatures, strict=True):
            data = p.read_bytes()
            compressed = False
            if compress is not None and len(data) >= BROTLI_MIN_BYTES:
                packed = compress(data)
                if len(packed) < len(data) - BROTLI_MIN_GAIN:
                    data, compressed = packed, True
            name = rel + ".br" if compressed else rel
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(aescbc.encrypt_bytes(data, session.session_key, session.iv))
            entries.append(
                DeltaEntry(
                    name, encode_signed_checksum(sig, fmt), d.hex(), out_dir / name, compressed
                )
            )
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
    session_key, iv = open_session_key(pub, iv_session_key)
    expected_hex, _ = open_checksum(pub, file_hash, None)
    try:
        plain = aescbc.decrypt_bytes(Path(enc_file).read_bytes(), session_key, iv)
    except aescbc.BadPadding as e:
        raise BundleVerificationError(f"AES decryption failed: {e}") from None
    if Path(enc_file).name.endswith(".br"):
        if decompress is None:
            raise BundleVerificationError(f"{enc_file} is brotli-compressed; pass decompress")
        plain = decompress(plain)
    if hashlib.sha256(plain).hexdigest() != expected_hex:
        raise BundleVerificationError(
            "checksum mismatch: SHA-256 of the decrypted file is not the signed file_hash"
        )
    return plain
