"""The KeyAdmin gRPC service: the calls security teams make.

Each handler turns the request into domain values (``server.api.convert``), calls
``server.ops.keyadmin`` and answers with the key as it now is. Errors become status codes in
the call pipeline (``server.api.pipeline``, the one mapping).
Nothing here logs key material: ImportKey's key is passed through (wrapped, or in clear only
when server.allow_plaintext_import allows it), never printed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server.api.convert import key_bits, key_to_pb, purpose, version_number
from server.api.pipeline import rpc
from server.config import Config, ServerConfig
from server.errors import InvalidArgument, PermissionDenied
from server.keyring.ring import KeyRing
from server.ops import key_import, keyadmin
from server.pkcs11.token import Token
from server.policy import Operation, gate


class AdminAccess:
    """Whether this daemon serves KeyAdmin at all (``server.key_admin``); who may do what to
    which key is the policy's (server/policy), checked before every call."""

    def __init__(self, server: ServerConfig) -> None:
        self.enabled = server.key_admin

    def check(self, context: grpc.ServicerContext) -> None:
        """Raises PermissionDenied when this daemon does not serve KeyAdmin."""
        if not self.enabled:
            raise PermissionDenied(
                "KeyAdmin is turned off on this daemon (server.key_admin = false); administer "
                "keys with 'hsmsignd keys' on its host, or through a daemon that serves KeyAdmin"
            )


_H = TypeVar("_H", bound=Callable[..., Any])


def _admin(handler: _H) -> _H:
    """Checks the caller against the daemon's AdminAccess before the call does anything."""

    @functools.wraps(handler)
    def wrapper(self: KeyAdminService, request: Any, context: grpc.ServicerContext) -> Any:
        self.access.check(context)
        return handler(self, request, context)

    return wrapper  # type: ignore[return-value]


class KeyAdminService(pb_grpc.KeyAdminServicer):
    """Create, rotate, list, get, set primary, disable, enable, destroy, import (and the
    import wrapping key)."""

    def __init__(self, token: Token, ring: KeyRing, config: Config) -> None:
        self.token, self.ring, self.config = token, ring, config
        self.access = AdminAccess(config.server)

    def _key(self, name: str) -> pb.Key:
        return key_to_pb(self.ring.get(name))

    @rpc
    @_admin
    def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        v = keyadmin.create_key(
            self.token,
            self.ring,
            request.name,
            purpose(request.purpose),
            key_bits(request.algorithm),
        )
        return self._key(v.name)

    @rpc
    @_admin
    def RotateKey(self, request: pb.RotateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        v = keyadmin.rotate_key(self.ring, request.name, request.make_primary)
        return self._key(v.name)

    @rpc
    @_admin
    def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.ServicerContext
    ) -> pb.ListKeysResponse:
        keys = [k for k in self.ring.list_keys() if gate.permits(Operation.LIST, k.name)]
        return pb.ListKeysResponse(keys=[key_to_pb(k) for k in keys])

    @rpc
    @_admin
    def GetKey(self, request: pb.GetKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        if not request.name:
            raise InvalidArgument("name is required")
        return self._key(request.name)

    @rpc
    @_admin
    def SetPrimaryVersion(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return key_to_pb(
            keyadmin.set_primary(self.ring, request.name, version_number(request.version))
        )

    @rpc
    @_admin
    def DisableKeyVersion(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return key_to_pb(
            keyadmin.disable_version(self.ring, request.name, version_number(request.version))
        )

    @rpc
    @_admin
    def EnableKeyVersion(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return key_to_pb(
            keyadmin.enable_version(self.ring, request.name, version_number(request.version))
        )

    @rpc
    @_admin
    def ScheduleKeyVersionDestruction(
        self, request: pb.ScheduleDestructionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        delay = (
            keyadmin.destruction_delay(request.delay.seconds + request.delay.nanos / 1e9)
            if request.HasField("delay")
            else None
        )
        return key_to_pb(
            keyadmin.schedule_destruction(
                self.ring, request.name, version_number(request.version), delay
            )
        )

    @rpc
    @_admin
    def CancelKeyVersionDestruction(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return key_to_pb(
            keyadmin.cancel_destruction(self.ring, request.name, version_number(request.version))
        )

    @rpc
    @_admin
    def GetImportWrappingKey(
        self, request: pb.GetImportWrappingKeyRequest, context: grpc.ServicerContext
    ) -> pb.ImportWrappingKey:
        return key_import.get_import_wrapping_key(self.ring)

    @rpc
    @_admin
    def ImportKey(self, request: pb.ImportKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        if request.HasField("wrapped"):
            v = key_import.import_wrapped_key(
                self.ring,
                request.name,
                purpose(request.purpose),
                request.wrapped,
                request.make_primary,
            )
            return self._key(v.name)
        key_import.check_plaintext_import_allowed(self.config.server, context.peer())
        if not request.private_key_der:
            raise InvalidArgument("private_key_der is empty")
        v = keyadmin.import_key(
            self.ring,
            request.name,
            purpose(request.purpose),
            request.private_key_der,
            request.make_primary,
        )
        return self._key(v.name)
