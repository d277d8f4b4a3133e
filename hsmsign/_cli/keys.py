"""``hsmsign keys ...``: key lifecycle over the KeyAdmin API.

Readable tables for people, ``--json`` for scripts. The actions, requests and rendering are
:mod:`hsmsign.keycommands`, shared with ``hsmsignd keys`` (the offline ceremony), so both
print the same thing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hsmsign import keycommands
from hsmsign._internal import plaintext
from hsmsign.admin import KeyAdmin, ask_passphrase_on_terminal
from hsmsign.client import Client


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
        if args.keys_command == "import" and c.plaintext:
            print(plaintext.IMPORT_WARNING, file=sys.stderr)
        out = command.run(KeyAdmin(c))
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr)
    return 0
