"""``hsmsign pubkey``, ``hsmsign sign`` and ``hsmsign verify``."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign import names
from hsmsign._internal.files import write_atomic
from hsmsign.capgo.project import set_capacitor_public_key
from hsmsign.client import Client, choose
from hsmsign.errors import UsageError, VerificationError

PUBKEY_FORMATS = ("spki", "pkcs1", "der", "capgo", "json")
#: RSA signature sizes of the key algorithms: a base64 file of this many bytes is decoded.
_SIGNATURE_BYTES = frozenset(a.bits // 8 for a in names.KEY_ALGORITHMS)
_CHUNK_BYTES = 1 << 20
_CRYPTO_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pubkey",
        help="print a key's public key",
        description="Print the public key of a key version.",
    )
    p.add_argument("key", metavar="KEY", help="NAME, NAME@VERSION, sha256:FP or keyid:ID")
    p.add_argument(
        "--format",
        choices=PUBKEY_FORMATS,
        default="spki",
        help="spki: PEM 'PUBLIC KEY' (default); pkcs1: PEM 'RSA PUBLIC KEY'; "
        "der: binary SPKI; capgo: PKCS#1 PEM as capacitor-updater embeds it; "
        "json: everything",
    )
    p.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    p.add_argument(
        "--capacitor-config",
        type=Path,
        metavar="FILE",
        help="write the PKCS#1 PEM into plugins.CapacitorUpdater.publicKey of this "
        "capacitor.config.json (the rest of the file is kept)",
    )
    p.set_defaults(func=cmd_pubkey)

    s = sub.add_parser(
        "sign",
        help="hash a file locally and have the HSM sign the digest",
        description="Hash a file (or take a digest) and sign it with an HSM key. "
        "Only the digest travels to the daemon.",
    )
    s.add_argument(
        "--key",
        required=True,
        metavar="KEY",
        help="the sign key: NAME, NAME@VERSION, sha256:FINGERPRINT or keyid:ID",
    )
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path, help="file to hash and sign ('-' for stdin)")
    src.add_argument("--digest", metavar="HEX", help="a digest computed elsewhere, in hex")
    s.add_argument(
        "--algorithm",
        choices=names.names(names.SIGNATURE_ALGORITHMS),
        default=names.DEFAULT_SIGNATURE_ALGORITHM,
        help="signature scheme (default: %(default)s)",
    )
    s.add_argument(
        "-o",
        "--output",
        type=Path,
        help="write the raw signature here (what 'openssl dgst -verify' reads); "
        "without it the signature is printed in base64",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_sign)

    v = sub.add_parser(
        "verify",
        help="check a signature over a file with the key's public key",
        description="Verify locally; the public key comes from the daemon "
        "unless --public-key is given.",
    )
    v.add_argument("--key", metavar="KEY", help="key whose public key to fetch")
    v.add_argument("--public-key", type=Path, metavar="PEM", help="verify offline with this PEM")
    v.add_argument("--file", type=Path, required=True)
    v.add_argument("--signature", type=Path, required=True, help="raw or base64 signature file")
    v.add_argument(
        "--algorithm",
        choices=names.names(names.SIGNATURE_ALGORITHMS),
        default=names.DEFAULT_SIGNATURE_ALGORITHM,
        help="signature scheme (default: %(default)s)",
    )
    v.set_defaults(func=cmd_verify)


def _signature_algorithm(name: str) -> names.SignatureAlgorithm:
    return choose(names.SIGNATURE_ALGORITHMS, name, "algorithm")


def hash_file(path: Path, hash_name: str) -> bytes:
    """The digest of a file ('-' for stdin). Raises UsageError if it cannot be read."""
    h = hashlib.new(hash_name)
    try:
        if str(path) == "-":
            for chunk in iter(lambda: sys.stdin.buffer.read(_CHUNK_BYTES), b""):
                h.update(chunk)
        else:
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
                    h.update(chunk)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    digest: bytes = h.digest()
    return digest


def _emit(data: bytes | str, output: Path | None) -> None:
    if output is not None:
        write_atomic(output, data.encode() if isinstance(data, str) else data)
    elif isinstance(data, bytes):
        sys.stdout.buffer.write(data)
    else:
        sys.stdout.write(data if data.endswith("\n") else data + "\n")


def cmd_pubkey(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    with connect() as c:
        pk = c.public_key(args.key)
    k = pk.key
    if args.capacitor_config is not None:
        set_capacitor_public_key(args.capacitor_config, pk.pkcs1_pem)
        print(
            f"wrote the public key of {k.name} v{k.version} (key_id {k.capgo_key_id}) to "
            f"{args.capacitor_config}",
            file=sys.stderr,
        )
        return 0
    if args.format == "spki":
        _emit(pk.spki_pem, args.output)
    elif args.format in ("pkcs1", "capgo"):
        _emit(pk.pkcs1_pem, args.output)
        if args.format == "capgo":
            print(f"capgo key_id: {k.capgo_key_id} ({k.name} v{k.version})", file=sys.stderr)
    elif args.format == "der":
        if args.output is None and sys.stdout.isatty():
            raise UsageError("refusing to write binary DER to a terminal; use -o FILE")
        _emit(pk.spki_der, args.output)
    else:
        _emit(
            json.dumps(
                {
                    "name": k.name,
                    "version": k.version,
                    "fingerprint": k.fingerprint,
                    "capgo_key_id": k.capgo_key_id,
                    "modulus_bits": k.modulus_bits,
                    "spki_pem": pk.spki_pem,
                    "pkcs1_pem": pk.pkcs1_pem,
                },
                indent=2,
            ),
            args.output,
        )
    return 0


def cmd_sign(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    hash_name = _signature_algorithm(args.algorithm).hash_name
    if args.digest is not None:
        try:
            digest = bytes.fromhex(args.digest)
        except ValueError:
            raise UsageError("--digest must be hexadecimal") from None
    else:
        digest = hash_file(args.file, hash_name)
    with connect() as c:
        sig = c.sign_digest(args.key, digest, args.algorithm)
    if args.output is not None:
        write_atomic(args.output, sig.signature)
    if args.json:
        print(
            json.dumps(
                {
                    "key": sig.key.name,
                    "version": sig.key.version,
                    "fingerprint": sig.key.fingerprint,
                    "algorithm": args.algorithm,
                    "digest": digest.hex(),
                    "signature": base64.b64encode(sig.signature).decode(),
                }
            )
        )
    elif args.output is None:
        print(base64.b64encode(sig.signature).decode())
    else:
        print(
            f"signed with {sig.key.name} v{sig.key.version} ({args.algorithm}); "
            f"signature written to {args.output}",
            file=sys.stderr,
        )
    return 0


def _load_public_key(path: Path) -> rsa.RSAPublicKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    try:
        if b"BEGIN RSA PUBLIC KEY" in data or b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except ValueError:
        raise UsageError(f"{path} is not a PEM or DER public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError(f"{path} is not an RSA public key")
    return key


def _read_signature(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    text = raw.strip()
    try:
        decoded = base64.b64decode(text, validate=True)
        if len(decoded) in _SIGNATURE_BYTES:
            return decoded
    except ValueError:
        pass
    return raw


def cmd_verify(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    if (args.key is None) == (args.public_key is None):
        raise UsageError("give exactly one of --key and --public-key")
    if args.public_key is not None:
        public_key, who = _load_public_key(args.public_key), str(args.public_key)
    else:
        with connect() as c:
            pk = c.public_key(args.key)
        loaded = serialization.load_der_public_key(pk.spki_der)
        if not isinstance(loaded, rsa.RSAPublicKey):
            raise UsageError(f"{args.key} is not an RSA key")
        public_key, who = loaded, f"{pk.key.name} v{pk.key.version}"
    algorithm = _signature_algorithm(args.algorithm)
    digest = hash_file(args.file, algorithm.hash_name)
    signature = _read_signature(args.signature)
    algo = _CRYPTO_HASHES[algorithm.hash_name]()
    pad: padding.AsymmetricPadding = (
        padding.PSS(mgf=padding.MGF1(algo), salt_length=algo.digest_size)
        if algorithm.pss
        else padding.PKCS1v15()
    )
    try:
        public_key.verify(signature, digest, pad, Prehashed(algo))
    except InvalidSignature:
        raise VerificationError(f"the signature does not match {args.file} under {who}") from None
    print(f"signature OK: {args.file} signed by {who} ({args.algorithm})")
    return 0
