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

from hsmsign import key_wrap, keycommands, names
from hsmsign.client import Client, choose
from hsmsign.errors import UsageError
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

    def GetImportWrappingKey(self, request: pb.GetImportWrappingKeyRequest) -> pb.ImportWrappingKey:
        # Slow the first time: the daemon makes the RSA-3072 key in the token.
        return self._send(self._c.admin.GetImportWrappingKey, request, _SLOW_CALL_TIMEOUT_S)

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

    def import_wrapping_key(self) -> key_wrap.WrappingKey:
        """The daemon's import wrapping key and OAEP hash. Raises RemoteError, or UsageError
        when the daemon's answer is unusable."""
        r = self.GetImportWrappingKey(pb.GetImportWrappingKeyRequest())
        try:
            return key_wrap.WrappingKey.from_pb(r)
        except key_wrap.UnsuitableKey as e:
            raise UsageError(str(e)) from None

    def import_key(
        self,
        name: str,
        private_key_der: bytes,
        purpose: str = names.DEFAULT_PURPOSE,
        make_primary: bool = False,
        to: key_wrap.WrappingKey | None = None,
    ) -> pb.Key:
        """Imports a DER PKCS#8 RSA key wrapped to the daemon's import wrapping key (``to``,
        fetched when not given), so that it is never in clear on the wire. Raises UsageError
        for an unknown purpose or a key that cannot be imported (not rsaEncryption,
        e != 65537, under 2048 bits), RemoteError from the daemon."""
        plain = self._import_request(name, private_key_der, purpose, make_primary)
        return self.ImportKey(wrapped_import_request(plain, to or self.import_wrapping_key()))

    def import_key_plaintext(
        self,
        name: str,
        private_key_der: bytes,
        purpose: str = names.DEFAULT_PURPOSE,
        make_primary: bool = False,
    ) -> pb.Key:
        """Sends the key IN CLEAR: for a ceremony on a daemon that sets
        server.allow_plaintext_import (refused with FAILED_PRECONDITION otherwise). Raises
        UsageError for an unknown purpose, RemoteError."""
        return self.ImportKey(self._import_request(name, private_key_der, purpose, make_primary))

    @staticmethod
    def _import_request(
        name: str, private_key_der: bytes, purpose: str, make_primary: bool
    ) -> pb.ImportKeyRequest:
        return pb.ImportKeyRequest(
            name=name,
            purpose=choose(names.PURPOSES, purpose, "purpose").pb,
            private_key_der=private_key_der,
            make_primary=make_primary,
        )


def wrapped_import_request(
    request: pb.ImportKeyRequest, to: key_wrap.WrappingKey
) -> pb.ImportKeyRequest:
    """The same ImportKey request with its plaintext ``private_key_der`` replaced by the key
    wrapped to ``to``. Raises UsageError for a key that cannot be imported."""
    try:
        wrapped = key_wrap.wrap_private_key(request.private_key_der, to)
    except key_wrap.UnsuitableKey as e:
        raise UsageError(str(e)) from None
    return pb.ImportKeyRequest(
        name=request.name,
        purpose=request.purpose,
        wrapped=wrapped,
        make_primary=request.make_primary,
    )


def ask_passphrase_on_terminal() -> keycommands.AskPassphrase | None:
    """Asks on the terminal, or None when stdin is not one (nobody to ask)."""
    if not sys.stdin.isatty():
        return None
    return lambda path: getpass.getpass(f"passphrase for {path}: ").encode()
