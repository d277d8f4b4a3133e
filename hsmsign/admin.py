"""Key administration through hsmsignd's KeyAdmin service.

Used by ``hsmsign keys ...`` and by scripts (key files to import are read by
:func:`hsmsign.keycommands.load_private_key_file`). Every call raises
:class:`hsmsign.errors.RemoteError` with the daemon's status and one-line message.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Callable
from typing import Final, TypeVar

from hsmsign import keycommands, names
from hsmsign.client import Client, choose
from hsmsign.v1 import hsmsign_pb2 as pb

T = TypeVar("T")

#: Key generation and import take longer than a signature.
_SLOW_CALL_TIMEOUT_S: Final = 120.0


class KeyAdmin:
    """Typed wrapper over the KeyAdmin stub of a :class:`Client`.

    The methods named like the RPCs take and return protobuf messages (this is the
    :class:`hsmsign.keycommands.KeyBackend` of ``hsmsign keys``); the others are the same
    calls by Python arguments.
    """

    def __init__(self, client: Client) -> None:
        self._c = client

    def _send(self, call: Callable[..., T], request: object, timeout: float | None = None) -> T:
        return self._c.call(lambda: call(request, timeout=timeout or self._c.timeout))

    # -- the RPCs --------------------------------------------------------------------------

    def ListKeys(self, request: pb.ListKeysRequest) -> pb.ListKeysResponse:
        return self._send(self._c.admin.ListKeys, request)

    def GetKey(self, request: pb.GetKeyRequest) -> pb.Key:
        return self._send(self._c.admin.GetKey, request)

    def CreateKey(self, request: pb.CreateKeyRequest) -> pb.Key:
        return self._send(self._c.admin.CreateKey, request, _SLOW_CALL_TIMEOUT_S)

    def RotateKey(self, request: pb.RotateKeyRequest) -> pb.Key:
        return self._send(self._c.admin.RotateKey, request, _SLOW_CALL_TIMEOUT_S)

    def ImportKey(self, request: pb.ImportKeyRequest) -> pb.Key:
        return self._send(self._c.admin.ImportKey, request, _SLOW_CALL_TIMEOUT_S)

    def SetPrimaryVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return self._send(self._c.admin.SetPrimaryVersion, request)

    def DisableKeyVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return self._send(self._c.admin.DisableKeyVersion, request)

    def EnableKeyVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return self._send(self._c.admin.EnableKeyVersion, request)

    def ScheduleKeyVersionDestruction(self, request: pb.ScheduleDestructionRequest) -> pb.Key:
        return self._send(self._c.admin.ScheduleKeyVersionDestruction, request)

    def CancelKeyVersionDestruction(self, request: pb.KeyVersionRequest) -> pb.Key:
        return self._send(self._c.admin.CancelKeyVersionDestruction, request)

    # -- by Python arguments -----------------------------------------------------------------

    def list_keys(self) -> list[pb.Key]:
        return list(self.ListKeys(pb.ListKeysRequest()).keys)

    def get_key(self, name: str) -> pb.Key:
        return self.GetKey(pb.GetKeyRequest(name=name))

    def create_key(
        self,
        name: str,
        purpose: str = names.DEFAULT_PURPOSE,
        algorithm: str = names.DEFAULT_KEY_ALGORITHM,
    ) -> pb.Key:
        """Raises UsageError for an unknown purpose or algorithm, RemoteError."""
        return self.CreateKey(
            pb.CreateKeyRequest(
                name=name,
                purpose=choose(names.PURPOSES, purpose, "purpose").pb,
                algorithm=choose(names.KEY_ALGORITHMS, algorithm, "algorithm").pb,
            )
        )

    def rotate_key(self, name: str, make_primary: bool = False) -> pb.Key:
        return self.RotateKey(pb.RotateKeyRequest(name=name, make_primary=make_primary))

    def set_primary(self, name: str, version: int) -> pb.Key:
        return self.SetPrimaryVersion(pb.KeyVersionRequest(name=name, version=version))

    def disable(self, name: str, version: int) -> pb.Key:
        return self.DisableKeyVersion(pb.KeyVersionRequest(name=name, version=version))

    def enable(self, name: str, version: int) -> pb.Key:
        return self.EnableKeyVersion(pb.KeyVersionRequest(name=name, version=version))

    def schedule_destruction(
        self, name: str, version: int, delay_seconds: float | None = None
    ) -> pb.Key:
        req = pb.ScheduleDestructionRequest(name=name, version=version)
        if delay_seconds is not None:
            req.delay.FromNanoseconds(int(delay_seconds * 1e9))
        return self.ScheduleKeyVersionDestruction(req)

    def cancel_destruction(self, name: str, version: int) -> pb.Key:
        return self.CancelKeyVersionDestruction(pb.KeyVersionRequest(name=name, version=version))

    def import_key(
        self,
        name: str,
        private_key_der: bytes,
        purpose: str = names.DEFAULT_PURPOSE,
        make_primary: bool = False,
    ) -> pb.Key:
        """Raises UsageError for an unknown purpose, RemoteError."""
        return self.ImportKey(
            pb.ImportKeyRequest(
                name=name,
                purpose=choose(names.PURPOSES, purpose, "purpose").pb,
                private_key_der=private_key_der,
                make_primary=make_primary,
            )
        )


def ask_passphrase_on_terminal() -> keycommands.AskPassphrase | None:
    """Asks on the terminal, or None when stdin is not one (nobody to ask)."""
    if not sys.stdin.isatty():
        return None
    return lambda path: getpass.getpass(f"passphrase for {path}: ").encode()
