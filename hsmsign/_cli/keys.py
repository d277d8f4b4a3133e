"""``hsmsign keys ...``: key lifecycle over the KeyAdmin API.

Readable tables for people, ``--json`` for scripts. The actions, requests and rendering are
:mod:`hsmsign.keycommands`, shared with ``hsmsignd keys`` (the offline ceremony), so both
print the same thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmsign import keycommands
from hsmsign._internal import plaintext
from hsmsign.admin import KeyAdmin, ask_passphrase_on_terminal, wrapped_import_request
from hsmsign.client import Client
from hsmsign.v1 import hsmsign_pb2 as pb


def register(sub: Any) -> None:
    keys = sub.add_parser(
        "keys",
        help="create, rotate, disable, destroy, import and list HSM keys",
        description="Key lifecycle through hsmsignd's KeyAdmin API (needs admin permission).",
    )
    ks = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    keycommands.add_actions(ks)
    keys.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    command = keycommands.prepare(args, Path.read_bytes, ask_passphrase_on_terminal())
    with connect() as c:
        admin = KeyAdmin(c)
        if args.keys_command == "import":
            if c.plaintext:
                warning = (
                    plaintext.IMPORT_WARNING
                    if args.plaintext_ceremony
                    else plaintext.WRAPPED_IMPORT_WARNING
                )
                print(warning, file=sys.stderr)
            command = _wrapped_unless_ceremony(command, admin, args.plaintext_ceremony)
        out = command.run(admin)
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return 0


def _wrapped_unless_ceremony(
    command: keycommands.KeyCommand, admin: KeyAdmin, plaintext_ceremony: bool
) -> keycommands.KeyCommand:
    """The import with its key wrapped to the daemon's import wrapping key (saying which, and
    the OAEP hash when it is not SHA-256), or left in clear for --plaintext-ceremony."""
    if plaintext_ceremony:
        print("warning: sending the private key in clear (--plaintext-ceremony)", file=sys.stderr)
        return command
    to = admin.import_wrapping_key()
    print(f"wrapping to the import key sha256:{to.fingerprint}", file=sys.stderr)
    if to.oaep_hash != pb.OAEP_HASH_SHA256:
        print(
            f"note: the daemon's token unwraps with RSA-OAEP {to.oaep_hash_name} only; "
            "wrapping with it",
            file=sys.stderr,
        )
    return dataclasses.replace(command, request=wrapped_import_request(command.request, to))
