"""``hsmsign audit verify|show``: check and read the daemon's audit trail offline.

``verify`` exits 0 when every chain and checkpoint is intact, 3 when something was changed,
removed, reordered, inserted or cut (the first such place is named), 1 when a file cannot be
read, 2 for bad usage. The audit public key: ``--public-key PEM`` (obtained out of band, for
instance from the daemon host's ``audit-key.pem`` at installation, or compared with the
fingerprint the daemon logs at start); without it the copy beside the trail is used and its
fingerprint printed, which proves only that the trail matches that file.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from hsmsign import auditlog, keyformats
from hsmsign.errors import EXIT_DOES_NOT_VERIFY, EXIT_OK, Error, UsageError


def add_parser(sub: Any) -> None:
    a = sub.add_parser(
        "audit",
        help="verify and list the daemon's audit trail (offline)",
        description="Check the hash chains and signed checkpoints of hsmsignd's audit trail, "
        "or list its records. Works on copies of the files; needs no daemon.",
    )
    asub = a.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    v = asub.add_parser(
        "verify",
        help="check every chain and checkpoint; name the first record that was tampered with",
        description="Exit 0: intact. 3: changed, removed, reordered, inserted or cut (the "
        "first place is named). 1: unreadable input. 2: bad usage.",
    )
    v.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="audit directory or files")
    v.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        help="the audit key's public key (default: audit-key.pem beside the trail, "
        "which an attacker could have replaced: compare its printed fingerprint)",
    )
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=lambda args, _connect: run(args))
    s = asub.add_parser(
        "show",
        help="list records by key, identity, operation and time",
        description="List calls and daemon actions, oldest first within each chain. "
        "Times are UTC (ISO 8601); --until is exclusive. Does not verify: run verify too.",
    )
    s.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="audit directory or files")
    s.add_argument("--key", help="key name or fingerprint")
    s.add_argument("--identity", help="text in the caller's identity (certificate name, ...)")
    s.add_argument("--operation", metavar="OP", help="RPC name, e.g. SignDigest")
    s.add_argument("--since", metavar="TIME", help="from this UTC time (2026-12-01T10:00Z)")
    s.add_argument("--until", metavar="TIME", help="before this UTC time")
    s.add_argument("--request-id", help="one call by its request id")
    s.add_argument("--json", action="store_true", help="one JSON record per line, as stored")
    s.set_defaults(func=lambda args, _connect: run(args))


#: ``hsmsign._cli`` registers command groups through ``register``.
register = add_parser


def run(args: argparse.Namespace) -> int:
    """Runs ``audit verify`` or ``audit show``. Raises UsageError (bad usage), Error
    (unreadable input: exit 1)."""
    try:
        if args.audit_command == "verify":
            return _verify(args)
        return _show(args)
    except auditlog.AuditFileError as e:
        raise Error(str(e)) from None


def _public_key(args: argparse.Namespace) -> tuple[rsa.RSAPublicKey, str]:
    path: Path | None = args.public_key
    source = "--public-key"
    if path is None:
        for p in args.paths:
            candidate = (p if p.is_dir() else p.parent) / auditlog.PUBLIC_KEY_FILE
            if candidate.exists():
                path, source = candidate, f"{candidate} (beside the trail)"
                break
        else:
            raise UsageError(
                "no audit public key: give --public-key PEM (audit-key.pem from the daemon's "
                "audit directory, obtained out of band)"
            )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise Error(f"cannot read {path}: {e.strerror}") from None
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise UsageError(f"{path}: not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise UsageError(f"{path}: not an RSA public key")
    return key, source


def _verify(args: argparse.Namespace) -> int:
    auditlog.discover(args.paths)  # unreadable input (exit 1) before a missing key (exit 2)
    key, source = _public_key(args)
    fingerprint = keyformats.fingerprint(key)
    report = auditlog.verify(args.paths, key)
    if args.json:
        out = report.to_json()
        out["public_key"] = {"fingerprint": fingerprint, "source": source}
        print(json.dumps(out, indent=2))
    else:
        print(f"audit key sha256:{fingerprint} from {source}")
        for c in report.chains:
            state = "intact" if not c.problems else "NOT INTACT"
            tail = f", {c.unsigned_tail} after the last checkpoint" if c.unsigned_tail else ""
            print(
                f"chain {c.chain}: {state}: {c.records} records, {c.checkpoints} checkpoints{tail}"
            )
            for p in c.problems:
                print(f"  {p}")
    return EXIT_OK if report.intact else EXIT_DOES_NOT_VERIFY


def _utc(text: str | None, flag: str) -> str | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: not an ISO 8601 time (2026-12-01T10:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _show(args: argparse.Namespace) -> int:
    wanted = auditlog.Filter(
        key=args.key,
        identity=args.identity,
        operation=args.operation,
        since=_utc(args.since, "--since"),
        until=_utc(args.until, "--until"),
    )
    for rec in auditlog.read(args.paths):
        if rec.get("kind") == "checkpoint" or not wanted.matches(rec):
            continue
        if args.request_id is not None and rec.get("request_id") != args.request_id:
            continue
        if args.json:
            print(auditlog.encode(rec).decode())
            continue
        ident = rec.get("identity") or {}
        who = f"{ident.get('kind', '-')}:{ident.get('name') or '-'}" if ident else "daemon"
        key = rec.get("key", "-")
        if "version" in rec:
            key = f"{key}@{rec['version']}"
        print(
            f"{rec.get('time', '-')} {rec.get('op', '-')} key={key} {rec.get('outcome', '-')} "
            f"status={rec.get('status', '-')} caller={who} peer={rec.get('peer', '-')} "
            f"request_id={rec.get('request_id', '-')} chain={rec.get('chain')}#{rec.get('seq')}"
        )
    sys.stdout.flush()
    return EXIT_OK
