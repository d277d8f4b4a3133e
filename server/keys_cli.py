"""`hsmsignd keys ...`: key administration straight on the token, with no daemon running.

For the first key of a new HSM, offline HSMs, and the dev token's demo key. The KeyAdmin gRPC
service (``admin_service``) does the same work for a running daemon.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server import admin
from server.config import Config
from server.keyring import KeyRing, KeyVersion, Purpose
from server.token import Token

_ALGORITHMS = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}


def add_parser(sub: Any) -> None:
    keys = sub.add_parser("keys", help="create and list keys directly on the token (no daemon)")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    for action, text in (
        ("create", "generate version 1 of a new key in the token"),
        ("ensure", "like create, but succeed quietly if the key exists"),
    ):
        c = ksub.add_parser(action, help=text)
        c.add_argument("name")
        c.add_argument("--purpose", choices=[p.value for p in Purpose], default="sign")
        c.add_argument(
            "--algorithm",
            choices=list(_ALGORITHMS),
            default="rsa-2048",
            help="RSA size; Capgo requires rsa-2048 (default)",
        )
        c.add_argument("--json", action="store_true", help="print one JSON object")
    ls = ksub.add_parser("list", help="list keys and versions")
    ls.add_argument("--json", action="store_true", help="print JSON")


def _version_json(v: KeyVersion) -> dict[str, Any]:
    return {
        "name": v.name,
        "version": v.version,
        "purpose": v.purpose.value,
        "bits": v.bits,
        "state": v.state.value,
        "primary": v.primary,
        "fingerprint": v.fingerprint,
        "capgo_key_id": v.capgo_key_id,
    }


def run(args: argparse.Namespace, cfg: Config) -> int:
    token = Token(cfg.token)
    try:
        ring = KeyRing(token, cfg)
        if args.keys_command in ("create", "ensure"):
            existing = next((k for k in ring.list_keys() if k.name == args.name), None)
            if existing is not None and args.keys_command == "ensure" and existing.primary:
                v, created = existing.primary, False
            else:
                v = admin.create_key(
                    token, ring, args.name, Purpose(args.purpose), _ALGORITHMS[args.algorithm]
                )
                created = True
            if args.json:
                print(json.dumps({**_version_json(v), "created": created}))
            else:
                verb = "created" if created else "exists:"
                print(
                    f"{verb} {v.name} v{v.version} RSA-{v.bits} {v.purpose.value} "
                    f"sha256:{v.fingerprint} capgo key_id {v.capgo_key_id}"
                )
            return 0
        versions = [v for k in ring.list_keys() for v in k.versions]
        if args.json:
            print(json.dumps([_version_json(v) for v in versions], indent=2))
        else:
            for v in versions:
                mark = "*" if v.primary else " "
                print(
                    f"{mark} {v.name:<24} v{v.version:<3} RSA-{v.bits} {v.purpose.value:<6} "
                    f"{v.state.value:<10} sha256:{v.fingerprint}"
                )
        return 0
    finally:
        token.close()


def admin_service(token: Token, ring: KeyRing, cfg: Config) -> pb_grpc.KeyAdminServicer:
    """The KeyAdmin servicer. Its calls answer UNIMPLEMENTED until key lifecycle lands."""
    return pb_grpc.KeyAdminServicer()
