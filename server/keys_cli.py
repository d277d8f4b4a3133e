"""`hsmsignd keys ...`: key administration straight on the token, with no daemon running.

For the first key of a new HSM, offline HSMs, and the dev token's demo key. It offers the same
actions as ``hsmsign keys`` and prints the same tables and JSON; both go through
``server.admin`` and the ring state in the token, so a daemon running on the same token picks
the change up within ``keyring.refresh_seconds``. The KeyAdmin gRPC service
(``admin_service``) does the same work for a running daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hsmsign import _cli_keys
from hsmsign.admin_client import read_private_key_file
from hsmsign.errors import HsmsignError
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server import admin
from server.admin_service import KeyAdminService, key_to_pb
from server.config import Config
from server.errors import InvalidArgument
from server.keyring import Key, KeyRing, Purpose
from server.token import Token

_ALGORITHMS = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}


def add_parser(sub: Any) -> None:
    what = "key lifecycle directly on the token (no daemon): create, rotate, import, ..."
    keys = sub.add_parser("keys", help=what, description=what[0].upper() + what[1:])
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    _cli_keys.add_actions(ksub, offline=True)


def run(args: argparse.Namespace, cfg: Config) -> int:
    token = Token(cfg.token)
    try:
        ring = KeyRing(token, cfg)
        return _run(args, token, ring)
    finally:
        token.close()


def _run(args: argparse.Namespace, token: Token, ring: KeyRing) -> int:
    cmd: str = args.keys_command
    as_json: bool = args.json
    if cmd == "list":
        _cli_keys.print_keys([key_to_pb(k) for k in ring.list_keys()], as_json)
    elif cmd == "get":
        _cli_keys.print_key(key_to_pb(ring.get(args.name)), as_json)
    elif cmd in ("create", "ensure"):
        existing = next((k for k in ring.list_keys() if k.name == args.name), None)
        if existing is not None and cmd == "ensure" and existing.primary:
            v = existing.primary
            if as_json:
                key = key_to_pb(existing)
                pv = next(x for x in key.versions if x.version == v.version)
                print(json.dumps({**_cli_keys.version_json(key, pv), "created": False}))
            else:
                print(
                    f"exists: {v.name} v{v.version} RSA-{v.bits} {v.purpose.value} "
                    f"sha256:{v.fingerprint} capgo key_id {v.capgo_key_id}"
                )
            return 0
        v = admin.create_key(
            token, ring, args.name, Purpose(args.purpose), _ALGORITHMS[args.algorithm]
        )
        _cli_keys.print_new_version(key_to_pb(ring.get(v.name)), v.version, "created", as_json)
    elif cmd == "rotate":
        v = admin.rotate_key(ring, args.name, args.make_primary)
        _cli_keys.print_new_version(key_to_pb(ring.get(v.name)), v.version, "rotated", as_json)
    elif cmd == "import":
        try:
            der = read_private_key_file(args.file, args.passphrase_file)
        except HsmsignError as e:
            raise InvalidArgument(str(e)) from None
        v = admin.import_key(ring, args.name, Purpose(args.purpose), der, args.make_primary)
        del der
        _cli_keys.print_new_version(key_to_pb(ring.get(v.name)), v.version, "imported as", as_json)
        print(_cli_keys.import_advice(args.file), file=sys.stderr)
    else:
        version: int = args.version
        changed: Key
        if cmd == "set-primary":
            changed = admin.set_primary(ring, args.name, version)
        elif cmd == "disable":
            changed = admin.disable_version(ring, args.name, version)
        elif cmd == "enable":
            changed = admin.enable_version(ring, args.name, version)
        elif cmd == "schedule-destroy":
            try:
                seconds = _cli_keys.parse_duration(args.delay) if args.delay else None
            except HsmsignError as e:
                raise InvalidArgument(str(e)) from None
            delay = admin.destruction_delay(seconds) if seconds is not None else None
            changed = admin.schedule_destruction(ring, args.name, version, delay)
        else:
            changed = admin.cancel_destruction(ring, args.name, version)
        _cli_keys.print_key(key_to_pb(changed), as_json)
    return 0


def admin_service(token: Token, ring: KeyRing, cfg: Config) -> pb_grpc.KeyAdminServicer:
    """The KeyAdmin servicer for a running daemon."""
    return KeyAdminService(token, ring, cfg)
