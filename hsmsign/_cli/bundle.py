"""``hsmsign bundle ...``: Capgo live-update bundles, sealed and signed by the HSM.

The bundle never travels: it is zipped, hashed and AES-encrypted here; only the 16-byte
session key and the 32-byte checksum go to hsmsignd.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli

from hsmsign import names
from hsmsign._cli.unwrap import decrypt_v1
from hsmsign._internal.files import atomic_directory
from hsmsign._internal.progress import progress_bar
from hsmsign.capgo.bundle import check_bundle_zip, seal_bundle, verify_bundle
from hsmsign.capgo.daemon import DaemonSealer
from hsmsign.capgo.delta import encrypt_delta
from hsmsign.capgo.format import (
    BundleFormatError,
    ChecksumFormat,
    checksum_format_for_plugin,
    plugin_supports_delta,
)
from hsmsign.capgo.project import default_zip_path, make_bundle_zip
from hsmsign.client import Client
from hsmsign.errors import UsageError, VerificationError

Connect = Callable[[], Client]
#: ``bundle decrypt --scheme v1 --oaep-hash H``: the unwrap scheme each hash names.
_OAEP_SCHEMES = {"sha256": "rsa-oaep-sha256", "sha1": "rsa-oaep-sha1"}
_DELTA_BUNDLE = "bundle_encrypted.zip"
_DELTA_FILES = "files"
_DELTA_MANIFEST = "manifest.json"
_CHUNK_BYTES = 1 << 20


def _format_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--checksum-format",
        choices=names.names(names.CHECKSUM_FORMATS),
        help="signed-checksum format: v3 (plugin 8.x and >= 5.30/6.30/7.30, the "
        "default) or v2 (older plugins)",
    )
    g.add_argument(
        "--plugin-version",
        metavar="X.Y.Z",
        help="the @capgo/capacitor-updater version of the target app; picks the format",
    )


def _fmt(args: argparse.Namespace) -> ChecksumFormat:
    if args.plugin_version:
        return checksum_format_for_plugin(args.plugin_version)
    return ChecksumFormat.from_name(args.checksum_format or names.DEFAULT_CHECKSUM_FORMAT)


def register(sub: Any) -> None:
    b = sub.add_parser(
        "bundle",
        help="Capgo live-update bundles: zip, encrypt, verify, decrypt",
        description="Capgo (capacitor-updater) bundles with the key in the HSM.",
    )
    bs = b.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    z = bs.add_parser("zip", help="zip a web build directory as a bundle")
    z.add_argument("dir", type=Path, help="web build (index.html at its root or in one folder)")
    z.add_argument("-o", "--output", type=Path, help="zip to write (default DIR.zip)")
    z.add_argument("--json", action="store_true")
    z.set_defaults(func=cmd_zip)

    e = bs.add_parser(
        "encrypt",
        help="encrypt a bundle zip and seal it with an HSM key",
        description="Hash and AES-128-CBC-encrypt the zip locally (streaming), "
        "have the HSM seal the session key and sign the checksum, "
        "and print the fields for 'npx @capgo/cli bundle upload'.",
    )
    e.add_argument("bundle", type=Path, help="the plain bundle zip")
    e.add_argument("--key", required=True, metavar="KEY", help="an RSA-2048 sign key")
    e.add_argument(
        "-o", "--output", type=Path, help="encrypted zip to write (default BUNDLE_encrypted.zip)"
    )
    _format_args(e)
    e.add_argument(
        "--external-url",
        default="<URL>",
        help="where the encrypted zip will be hosted (for the printed upload line)",
    )
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_encrypt)

    d = bs.add_parser(
        "encrypt-delta",
        help="encrypt a web build for a delta (manifest) update",
        description="Zip and encrypt the whole bundle, and encrypt every file with "
        "the same session key, with one batch call for all signed "
        "checksums. Writes OUT/bundle_encrypted.zip, OUT/files/ and "
        "OUT/manifest.json.",
    )
    d.add_argument("dir", type=Path, help="the web build whose changed files to encrypt")
    d.add_argument("--key", required=True, metavar="KEY", help="an RSA-2048 sign key")
    d.add_argument("-o", "--output", type=Path, required=True, help="new output directory")
    d.add_argument(
        "--disable-brotli",
        action="store_true",
        help="do not brotli-compress files (by default files of 8 KiB or more are "
        "compressed when it helps, named NAME.br, as the Capgo CLI does)",
    )
    _format_args(d)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_encrypt_delta)

    v = bs.add_parser(
        "verify",
        help="check an encrypted bundle exactly as the device does",
        description="Check with only the public key, as capacitor-updater does.",
    )
    _check_args(v)
    v.add_argument(
        "--plain",
        type=Path,
        metavar="ZIP",
        help="also check the bundle decrypts to exactly this plain zip",
    )
    v.set_defaults(func=cmd_verify)

    x = bs.add_parser(
        "decrypt",
        help="verify and decrypt an encrypted bundle",
        description="v2 (current): with the public key, as the device does. "
        "v1 (before Capgo CLI 5.0): the session key is unwrapped by "
        "the HSM (--key, an unwrap key).",
    )
    _check_args(x, decrypt=True)
    x.add_argument("-o", "--output", type=Path, required=True, help="plain zip to write")
    x.add_argument(
        "--scheme",
        choices=["v2", "v1"],
        default="v2",
        help="Capgo's encryption format (default: %(default)s)",
    )
    x.add_argument("--key", metavar="KEY", help="v1: the unwrap key holding the private key")
    x.add_argument(
        "--oaep-hash",
        choices=list(_OAEP_SCHEMES),
        default="sha256",
        help="v1: the OAEP hash (default: %(default)s, as Capgo used)",
    )
    x.set_defaults(func=cmd_decrypt)


def _check_args(p: argparse.ArgumentParser, decrypt: bool = False) -> None:
    p.add_argument("encrypted", type=Path, help="the encrypted bundle zip")
    p.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        required=not decrypt,
        help="PKCS#1 'RSA PUBLIC KEY' PEM (as in capacitor.config)"
        + ("; required for v2" if decrypt else ""),
    )
    p.add_argument("--iv-session-key", required=True, metavar="IV:KEY")
    p.add_argument(
        "--checksum",
        required=not decrypt,
        metavar="SIGNED",
        help="the signed checksum (hex V3 or base64 V2); v1: the CRC32 or SHA-256",
    )


def _read_pem(path: Path | None) -> str:
    if path is None:
        raise UsageError("--public-key is required")
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read public key {path}: {getattr(e, 'strerror', e)}") from None


def cmd_zip(args: argparse.Namespace, connect: Connect) -> int:
    out = args.output or default_zip_path(args.dir)
    checksum = make_bundle_zip(args.dir, out)
    if args.json:
        print(json.dumps({"bundle": str(out), "checksum": checksum}))
    else:
        print(f"wrote {out} (sha256 {checksum})")
    return 0


def _default_output(bundle: Path) -> Path:
    return bundle.with_name(f"{bundle.stem}_encrypted{bundle.suffix or '.zip'}")


def cmd_encrypt(args: argparse.Namespace, connect: Connect) -> int:
    fmt = _fmt(args)
    out = args.output or _default_output(args.bundle)
    with connect() as client:
        sealer = DaemonSealer(client, args.key)
        sealed = seal_bundle(args.bundle, out, sealer, fmt, progress_bar("encrypting"))
    key = sealer.key
    result = {
        "encrypted_bundle": str(out),
        "iv_session_key": sealed.iv_session_key,
        "signed_checksum": sealed.signed_checksum,
        "checksum": sealed.checksum_hex,
        "checksum_format": fmt.value,
        "key": key.name,
        "key_version": key.version,
        "fingerprint": key.fingerprint,
        "key_id": key.capgo_key_id,
        "upload_command": sealed.upload_command(args.external_url),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"encrypted bundle: {out}")
    print(
        f"key:              {key.name} v{key.version} "
        f"(sha256:{key.fingerprint}, Capgo key_id {key.capgo_key_id})"
    )
    print(f"checksum:         {sealed.checksum_hex} (signed, format {fmt.value})")
    print(f"ivSessionKey:     {sealed.iv_session_key}")
    print(f"signed checksum:  {sealed.signed_checksum}")
    print("\nupload it (after hosting the encrypted zip at URL):")
    print(f"  {sealed.upload_command(args.external_url)}")
    return 0


def _brotli(data: bytes) -> bytes:
    # Node's createBrotliCompress() defaults, which the Capgo CLI uses: quality 11.
    return bytes(brotli.compress(data, quality=11))


def cmd_encrypt_delta(args: argparse.Namespace, connect: Connect) -> int:
    fmt = _fmt(args)
    if args.plugin_version and not plugin_supports_delta(args.plugin_version):
        raise UsageError(
            f"capacitor-updater {args.plugin_version} does not apply delta updates; it needs "
            "5.10.0, 6.25.0, 7.0.30 or later: ship a full bundle with 'hsmsign bundle encrypt'"
        )
    out: Path = args.output
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything is built in a staging folder beside OUT, renamed to OUT once all succeeded.
    with atomic_directory(out) as staging:
        plain = staging / "bundle.zip"
        make_bundle_zip(args.dir, plain)
        with connect() as client:
            sealer = DaemonSealer(client, args.key)
            sealed = seal_bundle(
                plain, staging / _DELTA_BUNDLE, sealer, fmt, progress_bar("encrypting")
            )
            delta = encrypt_delta(
                args.dir,
                staging / _DELTA_FILES,
                sealer,
                fmt,
                sealed.session,
                compress=None if args.disable_brotli else _brotli,
            )
        plain.unlink()
        (staging / _DELTA_MANIFEST).write_text(delta.manifest_json())
    key = sealer.key
    result = {
        "encrypted_bundle": str(out / _DELTA_BUNDLE),
        "files": str(out / _DELTA_FILES),
        "manifest": str(out / _DELTA_MANIFEST),
        "file_count": len(delta.entries),
        "iv_session_key": sealed.iv_session_key,
        "signed_checksum": sealed.signed_checksum,
        "checksum_format": fmt.value,
        "key": key.name,
        "key_version": key.version,
        "key_id": key.capgo_key_id,
        "brotli_files": sum(e.compressed for e in delta.entries),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{len(delta.entries)} files encrypted under {out / _DELTA_FILES}; manifest "
            f"{out / _DELTA_MANIFEST}; full bundle {out / _DELTA_BUNDLE}"
        )
        print(f"ivSessionKey:    {sealed.iv_session_key}")
        print(f"signed checksum: {sealed.signed_checksum}")
    return 0


def _installable(plain: Path) -> None:
    """What the device does after the checks: unzip, and find index.html."""
    try:
        with zipfile.ZipFile(plain) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise VerificationError(
            f"the decrypted bundle is not a zip the device can unzip: {e}"
        ) from None
    if bad is not None:
        raise VerificationError(f"the decrypted bundle's zip is corrupt at {bad}")
    try:
        check_bundle_zip(plain)
    except BundleFormatError as e:
        raise VerificationError(f"the decrypted bundle would not install: {e}") from None


def cmd_verify(args: argparse.Namespace, connect: Connect) -> int:
    with tempfile.TemporaryDirectory(prefix="hsmsign-verify-") as tmp:
        plain = Path(tmp) / "bundle.zip"
        r = verify_bundle(
            args.encrypted,
            _read_pem(args.public_key),
            args.iv_session_key,
            args.checksum,
            plain_out=plain,
        )
        _installable(plain)
    if args.plain is not None:
        h = hashlib.sha256()
        try:
            with args.plain.open("rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
                    h.update(chunk)
        except OSError as e:
            raise UsageError(f"cannot read {args.plain}: {e.strerror}") from None
        if h.hexdigest() != r.checksum_hex:
            raise VerificationError(f"the bundle does not decrypt to {args.plain}")
    print(
        f"bundle OK: {args.encrypted} (checksum {r.checksum_hex}, format "
        f"{r.checksum_format.value}, key_id {r.key_id}, {r.plain_size:,} bytes plain)"
    )
    return 0


def cmd_decrypt(args: argparse.Namespace, connect: Connect) -> int:
    if args.scheme == "v1":
        if args.key is None:
            raise UsageError("--scheme v1 needs --key: the unwrap key that holds the private key")
        return decrypt_v1(
            args.encrypted,
            args.output,
            args.iv_session_key,
            args.key,
            _OAEP_SCHEMES[args.oaep_hash],
            args.checksum,
            connect,
        )
    if args.checksum is None:
        raise UsageError("--checksum is required for v2 bundles (the device requires it)")
    r = verify_bundle(
        args.encrypted,
        _read_pem(args.public_key),
        args.iv_session_key,
        args.checksum,
        plain_out=args.output,
    )
    print(
        f"decrypted {args.encrypted} -> {args.output} (checksum verified, {r.plain_size:,} bytes)"
    )
    return 0
