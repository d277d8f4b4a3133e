"""`hsmsignd keys ...`: key administration straight on the token, with no daemon running.

For the first key of a new HSM, offline HSMs, and the dev token's demo key. The actions,
the argument checks, the requests and the rendering are :mod:`hsmsign.keycommands`, the
same as ``hsmsign keys``, so both print the same thing; here the KeyAdmin calls are
answered by :class:`OfflineKeyAdmin` from :mod:`server.ops.keyadmin` and the ring state in
the token, so a daemon running on the same token picks the change up within
``keyring.refresh_seconds``. With ``[audit] path``, every change is on the audit trail's
``offline`` chain (intent, change, outcome: :mod:`server.audit.offline`).
Arguments (and the key file of an import) are checked before the token is opened.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import sys
from pathlib import Path
from typing import Any, Final

from hsmsign import keycommands, names
from hsmsign.v1 import hsmsign_pb2 as pb
from server.api.convert import key_to_pb
from server.audit import offline as audit_offline
from server.config import Config
from server.errors import InvalidArgument
from server.keyring.model import Purpose
from server.keyring.ring import KeyRing
from server.ops import keyadmin as admin
from server.pkcs11.token import Token

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1


def add_parser(sub: Any) -> None:
    what = "key lifecycle directly on the token (no daemon): create, rotate, import, ..."
    keys = sub.add_parser("keys", help=what, description=what[0].upper() + what[1:])
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    keycommands.add_actions(ksub, offline=True)


def _ask_passphrase() -> keycommands.AskPassphrase | None:
    if not sys.stdin.isatty():
        return None
    return lambda path: getpass.getpass(f"passphrase for {path}: ").encode()


def _purpose(value: int) -> Purpose:
    row = names.by_pb(names.PURPOSES, value)
    if row is None:
        raise InvalidArgument(f"purpose must be one of {', '.join(names.names(names.PURPOSES))}")
    return Purpose(row.name)


def _bits(value: int) -> int:
    row = names.by_pb(names.KEY_ALGORITHMS, value)
    if row is None:
        raise InvalidArgument(
            f"algorithm must be one of {', '.join(names.names(names.KEY_ALGORITHMS))}"
        )
    return row.bits


class OfflineKeyAdmin:
    """The KeyAdmin calls answered from the token itself (a keycommands.KeyBackend)."""

    def __init__(self, token: Token, ring: KeyRing) -> None:
        self._token, self._ring = token, ring

    def _key(self, name: str) -> pb.Key:
        return key_to_pb(self._ring.get(name))

    def ListKeys(self, request: pb.ListKeysRequest) -> pb.ListKeysResponse:
        return pb.ListKeysResponse(keys=[key_to_pb(k) for k in self._ring.list_keys()])

    def GetKey(self, request: pb.GetKeyRequest) -> pb.Key:
        return self._key(request.name)

    def CreateKey(self, request: pb.CreateKeyRequest) -> pb.Key:
        purpose, bits = _purpose(request.purpose), _bits(request.algorithm)
        v = admin.create_key(self._token, self._ring, request.name, purpose, bits)
        return self._key(v.name)

    def RotateKey(self, request: pb.RotateKeyRequest) -> pb.Key:
        return self._key(admin.rotate_key(self._ring, request.name, request.make_primary).name)

    def ImportKey(self, request: pb.ImportKeyRequest) -> pb.Key:
        v = admin.import_key(
            self._ring,
            request.name,
            _purpose(request.purpose),
            request.private_key_der,
            request.make_primary,
        )
        return self._key(v.name)

    def SetPrimaryVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return key_to_pb(admin.set_primary(self._ring, request.name, request.version))

    def DisableKeyVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return key_to_pb(admin.disable_version(self._ring, request.name, request.version))

    def EnableKeyVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return key_to_pb(admin.enable_version(self._ring, request.name, request.version))

    def ScheduleKeyVersionDestruction(self, request: pb.ScheduleDestructionRequest) -> pb.Key:
        delay = (
            admin.destruction_delay(request.delay.seconds + request.delay.nanos / 1e9)
            if request.HasField("delay")
            else None
        )
        changed = admin.schedule_destruction(self._ring, request.name, request.version, delay)
        return key_to_pb(changed)

    def CancelKeyVersionDestruction(self, request: pb.KeyVersionRequest) -> pb.Key:
        return key_to_pb(admin.cancel_destruction(self._ring, request.name, request.version))


def _write(out: keycommands.Output) -> int:
    try:
        sys.stdout.write(out.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (``hsmsignd keys list | head``): stop quietly, and point stdout
        # at /dev/null so that the interpreter's last flush at exit does not fail again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    sys.stderr.write(out.stderr)
    return EXIT_OK


def run(args: argparse.Namespace, cfg: Config) -> int:
    """Check the arguments, then open the token, run the action and print its output.

    Usage errors exit 2 (as with ``hsmsign keys``) before the token is touched; errors of
    the token or the ring raise ServerError for ``server.main`` to report.
    """
    try:
        command = keycommands.prepare(args, Path.read_bytes, _ask_passphrase())
    except (keycommands.BadArguments, names.UnknownName) as e:
        print(f"hsmsignd: error: {e}", file=sys.stderr)
        return keycommands.EXIT_USAGE
    token = Token(cfg.token)
    try:
        # The trail before the ring: reading the ring may carry out a due destruction.
        with audit_offline.opened(cfg, token) as trail:
            backend = OfflineKeyAdmin(token, KeyRing(token, cfg, destroys_due=True))
            out = command.run(trail.audited(backend) if trail is not None else backend)
    finally:
        token.close()
    code = _write(out)
    for line in trail.unaudited if trail is not None else ():
        print(f"hsmsignd: error: {line}", file=sys.stderr)
        code = EXIT_ERROR
    return code
