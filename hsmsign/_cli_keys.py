"""``hsmsign keys ...``: key lifecycle over the KeyAdmin API.

Readable tables for people, ``--json`` for scripts. The presentation functions here are also
used by ``hsmsignd keys ...`` (the offline ceremony) so both print the same thing.

JSON shapes: ``list`` prints a list of version objects; ``create``, ``rotate`` and ``import``
print the new version's object (with its public key PEMs); the other actions and ``get``
print the key: ``{name, purpose, algorithm, primary_version, versions: [...]}``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmsign.admin_client import KEY_ALGORITHMS, PURPOSES, KeyAdmin, read_private_key_file
from hsmsign.client import Client
from hsmsign.errors import UsageError
from hsmsign.v1 import hsmsign_pb2 as pb

_STATE_NAMES = {
    pb.KEY_VERSION_STATE_ENABLED: "enabled",
    pb.KEY_VERSION_STATE_DISABLED: "disabled",
    pb.KEY_VERSION_STATE_DESTRUCTION_SCHEDULED: "destruction-scheduled",
    pb.KEY_VERSION_STATE_DESTROYED: "destroyed",
}
_PURPOSE_NAMES = {v: k for k, v in PURPOSES.items()}
_ALGORITHM_NAMES = {v: k for k, v in KEY_ALGORITHMS.items()}
_DURATION_RE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` in seconds."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise UsageError(f"bad duration {text!r}: use e.g. 0s, 30m, 24h or 7d")
    return float(m["n"]) * _UNITS[m["unit"]]


# -- presentation (shared with hsmsignd keys) ------------------------------------------------


def _time(key: pb.KeyVersion, field: str) -> str | None:
    if not key.HasField(field):  # type: ignore[arg-type]
        return None
    ts = getattr(key, field)
    text: str = ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")
    return text


def version_json(key: pb.Key, v: pb.KeyVersion) -> dict[str, Any]:
    bits = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}.get(
        _ALGORITHM_NAMES.get(key.algorithm, ""), 0
    )
    p = v.provenance
    return {
        "name": key.name,
        "version": v.version,
        "purpose": _PURPOSE_NAMES.get(key.purpose, "unspecified"),
        "algorithm": _ALGORITHM_NAMES.get(key.algorithm, "unspecified"),
        "bits": bits,
        "state": _STATE_NAMES.get(v.state, "unspecified"),
        "primary": v.primary,
        "created_at": _time(v, "created_at"),
        "destroy_at": _time(v, "destroy_at"),
        "fingerprint": v.fingerprint,
        "capgo_key_id": v.capgo_key_id,
        "provenance": {
            "imported": p.imported,
            "local": p.local,
            "never_extractable": p.never_extractable,
            "always_sensitive": p.always_sensitive,
            "extractable": p.extractable,
            "sensitive": p.sensitive,
        },
    }


def key_json(key: pb.Key) -> dict[str, Any]:
    return {
        "name": key.name,
        "purpose": _PURPOSE_NAMES.get(key.purpose, "unspecified"),
        "algorithm": _ALGORITHM_NAMES.get(key.algorithm, "unspecified"),
        "primary_version": key.primary_version,
        "versions": [version_json(key, v) for v in key.versions],
    }


def _provenance(v: pb.KeyVersion) -> str:
    p = v.provenance
    if v.state == pb.KEY_VERSION_STATE_DESTROYED:
        return "-"
    words = ["imported" if p.imported else ("generated" if p.local else "not-local")]
    if p.extractable:
        words.append("EXTRACTABLE")
    elif p.never_extractable and p.always_sensitive:
        words.append("never-extractable")
    else:
        words.append("non-extractable")
    return ",".join(words)


def print_keys(keys: list[pb.Key], as_json: bool) -> None:
    if as_json:
        print(json.dumps([version_json(k, v) for k in keys for v in k.versions], indent=2))
        return
    if not keys:
        print("no keys")
        return
    rows = [("KEY", "VER", "STATE", "PURPOSE", "ALGORITHM", "CREATED", "ORIGIN", "FINGERPRINT")]
    for k in keys:
        for v in k.versions:
            j = version_json(k, v)
            state = j["state"] + (f" (at {j['destroy_at']})" if j["destroy_at"] else "")
            rows.append(
                (
                    k.name,
                    f"{'*' if v.primary else ' '}v{v.version}",
                    state,
                    j["purpose"],
                    j["algorithm"],
                    j["created_at"] or "-",
                    _provenance(v),
                    f"sha256:{v.fingerprint[:16]}… keyid:{v.capgo_key_id}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    print("(* = primary version)")


def print_key(key: pb.Key, as_json: bool) -> None:
    if as_json:
        print(json.dumps(key_json(key), indent=2))
    else:
        print_keys([key], False)


def print_new_version(key: pb.Key, version: int, verb: str, as_json: bool) -> None:
    """The new version and its public key in the formats users paste."""
    v = next(x for x in key.versions if x.version == version)
    if as_json:
        print(
            json.dumps(
                {
                    **version_json(key, v),
                    "spki_pem": v.spki_pem,
                    "pkcs1_pem": v.pkcs1_pem,
                    "created": True,
                },
                indent=2,
            )
        )
        return
    role = "primary" if v.primary else f"not primary; primary is v{key.primary_version}"
    print(f"{verb} {key.name} v{v.version} ({_ALGORITHM_NAMES.get(key.algorithm, '?')}, {role})")
    print(f"fingerprint: sha256:{v.fingerprint}")
    print(f"Capgo key_id: {v.capgo_key_id}")
    print("\nPublic key (PEM, SubjectPublicKeyInfo):")
    print(v.spki_pem, end="")
    print("\nCapgo publicKey (capacitor.config: plugins.CapacitorUpdater.publicKey):")
    print(v.pkcs1_pem, end="")


def newest_version(key: pb.Key) -> int:
    return max(v.version for v in key.versions)


# -- commands --------------------------------------------------------------------------------


def register(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, rotate, disable, destroy, import and list HSM keys",
        description="Key lifecycle through hsmsignd's KeyAdmin API (needs admin permission).",
    )
    ks = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    add_actions(ks)
    keys.set_defaults(func=cmd_keys)


def add_actions(ks: Any, offline: bool = False) -> None:
    """The actions, shared by ``hsmsign keys`` and ``hsmsignd keys``."""

    def action(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ks.add_parser(name, help=text, description=text)
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    action("list", "list keys and their versions")
    action("get", "one key's versions, states and provenance").add_argument("name")
    for name, text in (
        ("create", "generate version 1 of a new key in the token"),
        *((("ensure", "like create, but succeed quietly if the key exists"),) if offline else ()),
    ):
        c = action(name, text)
        c.add_argument("name")
        c.add_argument(
            "--purpose",
            choices=list(PURPOSES),
            default="sign",
            help="sign or unwrap, never both (default: %(default)s)",
        )
        c.add_argument(
            "--algorithm",
            choices=list(KEY_ALGORITHMS),
            default="rsa-2048",
            help="RSA size; Capgo requires rsa-2048 (default)",
        )
    r = action("rotate", "generate a new version of a key (its purpose and size)")
    r.add_argument("name")
    r.add_argument(
        "--no-primary",
        dest="make_primary",
        action="store_false",
        help="keep the current primary (default: the new version becomes primary)",
    )
    for name, text in (
        ("set-primary", "make a version the one used by requests that name only the key"),
        ("disable", "refuse a version for new operations (not the primary)"),
        ("enable", "allow a disabled version again"),
        ("cancel-destroy", "cancel a scheduled destruction (the version becomes disabled)"),
    ):
        a = action(name, text)
        a.add_argument("name")
        a.add_argument("version", type=int)
    d = action("schedule-destroy", "destroy a version's key objects in the token after a delay")
    d.add_argument("name")
    d.add_argument("version", type=int)
    d.add_argument(
        "--delay",
        default=None,
        metavar="DURATION",
        help="e.g. 24h (default), 7d, 30m; never below the daemon's minimum",
    )
    i = action(
        "import",
        "write an existing RSA private key (e.g. .capgo_key_v2) into the token as a new version",
    )
    i.add_argument("file", type=Path, help="PEM or DER, PKCS#1 or PKCS#8")
    i.add_argument("--name", required=True, help="key to add the version to (or create)")
    i.add_argument(
        "--purpose",
        choices=list(PURPOSES),
        default="sign",
        help="sign or unwrap, never both (default: %(default)s)",
    )
    i.add_argument("--make-primary", action="store_true", help="make the imported version primary")
    i.add_argument(
        "--passphrase-file", type=Path, metavar="FILE", help="passphrase of an encrypted key"
    )
    if not offline:  # the offline import never crosses a network
        i.add_argument(
            "--plaintext-ceremony",
            action="store_true",
            help="send the key IN CLEAR (only to a daemon with server.allow_plaintext_import, on "
            "loopback); the default wraps it to the daemon's import wrapping key",
        )


def import_advice(path: Path) -> str:
    return (
        f"Check that the fingerprint or Capgo key_id above matches the public key your apps "
        f"ship, then destroy the key file: shred -u {path}"
    )


def cmd_keys(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    cmd = args.keys_command
    as_json = args.json
    with connect() as c:
        admin = KeyAdmin(c)
        if cmd == "list":
            print_keys(admin.list_keys(), as_json)
        elif cmd == "get":
            print_key(admin.get_key(args.name), as_json)
        elif cmd == "create":
            key = admin.create_key(args.name, args.purpose, args.algorithm)
            print_new_version(key, newest_version(key), "created", as_json)
        elif cmd == "rotate":
            key = admin.rotate_key(args.name, args.make_primary)
            print_new_version(key, newest_version(key), "rotated", as_json)
        elif cmd == "import":
            der = read_private_key_file(args.file, args.passphrase_file)
            if args.plaintext_ceremony:
                print(
                    "warning: sending the private key in clear (--plaintext-ceremony)",
                    file=sys.stderr,
                )
                key = admin.import_key_plaintext(args.name, der, args.purpose, args.make_primary)
            else:
                to = admin.import_wrapping_key()
                print(f"wrapping to the import key sha256:{to.fingerprint}", file=sys.stderr)
                if to.oaep_hash != pb.OAEP_HASH_SHA256:
                    print(
                        f"note: the daemon's token unwraps with RSA-OAEP {to.oaep_hash_name} "
                        "only; wrapping with it",
                        file=sys.stderr,
                    )
                key = admin.import_key(args.name, der, args.purpose, args.make_primary, to)
            del der
            print_new_version(key, newest_version(key), "imported as", as_json)
            print(import_advice(args.file), file=sys.stderr)
        else:
            version: int = args.version
            if version < 1:
                raise UsageError("version must be 1 or more")
            if cmd == "set-primary":
                key = admin.set_primary(args.name, version)
            elif cmd == "disable":
                key = admin.disable(args.name, version)
            elif cmd == "enable":
                key = admin.enable(args.name, version)
            elif cmd == "schedule-destroy":
                delay = parse_duration(args.delay) if args.delay is not None else None
                key = admin.schedule_destruction(args.name, version, delay)
            else:
                key = admin.cancel_destruction(args.name, version)
            print_key(key, as_json)
    return 0
