"""``hsmsign unwrap key|rewrap|bundle``: session keys unwrapped by an HSM-held key.

``unwrap bundle`` decrypts a bundle made with Capgo's older OAEP ("v1") scheme; so does
``bundle decrypt --scheme v1``, through the same :func:`decrypt_v1`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmsign import names
from hsmsign._internal.files import write_atomic
from hsmsign._internal.progress import progress_bar
from hsmsign.capgo.format import parse_iv_session_key
from hsmsign.capgo.legacy import V1_UNWRAP_SCHEME, decrypt_v1_bundle
from hsmsign.client import Client
from hsmsign.errors import UsageError
from hsmsign.unwrap_client import rewrap_session_key, unwrap_session_key

_SCHEMES = names.names(names.UNWRAP_SCHEMES)
_WRAP_TARGETS = [s.name for s in names.UNWRAP_SCHEMES if s.wrap_target]

_KEY_HELP = "NAME, NAME@VERSION, sha256:FP or keyid:ID of an unwrap key"


def _add_wrapped_input(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wrapped", type=Path, metavar="FILE", help="the wrapped key, raw bytes")
    src.add_argument("--wrapped-b64", metavar="B64", help="the wrapped key in base64")
    src.add_argument(
        "--iv-session-key", metavar="IV:KEY", help="a Capgo ivSessionKey field (its key part)"
    )


def register(sub: Any) -> None:
    u = sub.add_parser(
        "unwrap",
        help="unwrap session keys with an HSM key; decrypt Capgo v1 bundles",
        description="Unwrap RSA-wrapped session keys with a key that stays in the HSM.",
    )
    usub = u.add_subparsers(dest="unwrap_command", metavar="COMMAND", required=True)

    k = usub.add_parser(
        "key",
        help="print the session key a wrapped key carries",
        description="Unwrap one session key. Without -o it is printed (base64 by default).",
    )
    k.add_argument("--key", required=True, metavar="KEY", help=_KEY_HELP)
    k.add_argument(
        "--scheme",
        choices=_SCHEMES,
        default=names.DEFAULT_UNWRAP_SCHEME,
        help="how the session key was wrapped (default: %(default)s; SoftHSM2 supports OAEP "
        "with SHA-1 only: rsa-oaep-sha1)",
    )
    _add_wrapped_input(k)
    k.add_argument("--format", choices=("base64", "hex", "raw"), default="base64")
    k.add_argument("-o", "--output", type=Path, help="write the session key here (mode 0600)")
    k.add_argument("--json", action="store_true", help="print one JSON object")
    k.set_defaults(func=cmd_unwrap_key)

    r = usub.add_parser(
        "rewrap",
        help="re-encrypt a wrapped key to another key version (e.g. after a rotation)",
        description="The daemon unwraps and re-encrypts; the session key never reaches "
        "this machine. With --iv-session-key the output is a new ivSessionKey field.",
    )
    r.add_argument("--from-key", required=True, metavar="KEY", help=_KEY_HELP)
    r.add_argument("--to-key", required=True, metavar="KEY", help=_KEY_HELP)
    r.add_argument("--from-scheme", choices=_SCHEMES, default=names.DEFAULT_UNWRAP_SCHEME)
    r.add_argument("--to-scheme", choices=_WRAP_TARGETS, default=names.DEFAULT_UNWRAP_SCHEME)
    _add_wrapped_input(r)
    r.add_argument("-o", "--output", type=Path, help="write the result here")
    r.set_defaults(func=cmd_rewrap)

    b = usub.add_parser(
        "bundle",
        help="decrypt a bundle made with Capgo's v1 (RSA-OAEP) scheme",
        description="Unwrap the session key through hsmsignd, then decrypt the bundle "
        "locally (AES-128-CBC), streaming; the output appears only if everything succeeded.",
    )
    b.add_argument("encrypted", type=Path, metavar="ENC", help="the encrypted bundle")
    b.add_argument("--key", required=True, metavar="KEY", help=_KEY_HELP)
    b.add_argument("--iv-session-key", required=True, metavar="IV:KEY")
    b.add_argument(
        "--scheme",
        choices=_WRAP_TARGETS,
        default=V1_UNWRAP_SCHEME,
        help="how the session key was wrapped (default: %(default)s, as Capgo v1 did)",
    )
    b.add_argument("--checksum", metavar="HEX", help="expected CRC32 (v1) or SHA-256 of the zip")
    b.add_argument("-o", "--output", type=Path, required=True, help="the decrypted zip")
    b.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    b.set_defaults(func=cmd_bundle)


def _wrapped(args: argparse.Namespace) -> bytes:
    if args.wrapped is not None:
        try:
            data: bytes = args.wrapped.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read {args.wrapped}: {e.strerror}") from None
        return data
    if args.wrapped_b64 is not None:
        try:
            return base64.b64decode(args.wrapped_b64, validate=True)
        except binascii.Error:
            raise UsageError("--wrapped-b64 is not valid base64") from None
    return parse_iv_session_key(args.iv_session_key)[1]


def cmd_unwrap_key(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    wrapped = _wrapped(args)
    with connect() as c:
        u = unwrap_session_key(c, args.key, wrapped, args.scheme)
    hex_wanted = args.format == "hex"
    text = u.session_key.hex() if hex_wanted else base64.b64encode(u.session_key).decode()
    if args.output is not None:
        data = u.session_key if args.format == "raw" else (text + "\n").encode()
        write_atomic(args.output, data, mode=0o600)
        print(
            f"unwrapped with {u.key.name} v{u.key.version}; session key written to {args.output}",
            file=sys.stderr,
        )
    elif args.json:
        print(json.dumps({"key": u.key.name, "version": u.key.version, "session_key": text}))
    elif args.format == "raw":
        if sys.stdout.isatty():
            raise UsageError("refusing to write raw key bytes to a terminal; use -o FILE")
        sys.stdout.buffer.write(u.session_key)
    else:
        print(text)
    return 0


def cmd_rewrap(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    wrapped = _wrapped(args)
    with connect() as c:
        r = rewrap_session_key(
            c,
            args.from_key,
            wrapped,
            args.to_key,
            from_scheme=args.from_scheme,
            to_scheme=args.to_scheme,
        )
    if args.iv_session_key is not None:
        iv_b64 = args.iv_session_key.strip().split(":")[0]
        text = f"{iv_b64}:{base64.b64encode(r.wrapped_key).decode()}"
    else:
        text = base64.b64encode(r.wrapped_key).decode()
    if args.output is not None:
        write_atomic(args.output, (text + "\n").encode())
    else:
        print(text)
    print(
        f"rewrapped from {r.from_key.name} v{r.from_key.version} to "
        f"{r.to_key.name} v{r.to_key.version}",
        file=sys.stderr,
    )
    return 0


def decrypt_v1(
    encrypted: Path,
    output: Path,
    iv_session_key: str,
    key: str,
    scheme: str,
    checksum: str | None,
    connect: Callable[[], Client],
    show_progress: bool = True,
) -> int:
    """The one v1 decryption of the CLI: the daemon unwraps, the payload is decrypted here
    into ``output``, which appears only if every check passed. Raises UsageError,
    VerificationError, RemoteError."""
    with connect() as c:
        used: list[str] = []

        def unwrap(wrapped: bytes) -> bytes:
            u = unwrap_session_key(c, key, wrapped, scheme)
            used.append(f"{u.key.name} v{u.key.version}")
            return u.session_key

        crc = decrypt_v1_bundle(
            encrypted,
            output,
            iv_session_key,
            unwrap,
            checksum=checksum,
            progress=progress_bar("decrypting", show_progress),
        )
    checked = " (checksum matches)" if checksum else ""
    print(
        f"decrypted {encrypted} -> {output} with {used[0]}; crc32 {crc}{checked}",
        file=sys.stderr,
    )
    return 0


def cmd_bundle(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    return decrypt_v1(
        args.encrypted,
        args.output,
        args.iv_session_key,
        args.key,
        args.scheme,
        args.checksum,
        connect,
        show_progress=not args.no_progress,
    )
