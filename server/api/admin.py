"""The KeyAdmin gRPC service: the calls security teams make.

Each handler turns the request into domain values (``server.api.convert``), calls
``server.ops.keyadmin`` and answers with the key as it now is. Errors become status codes in
the call pipeline (``server.api.pipeline``, the one mapping).
Nothing here logs key material: ImportKey's private key is passed through, never printed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server.api.convert import key_bits, key_to_pb, purpose, version_number
from server.api.pipeline import rpc
from server.config import Config, ServerConfig
from server.errors import InvalidArgument, PermissionDenied
from server.keyring.ring import KeyRing
from server.ops import keyadmin
from server.pkcs11.token import Token


class AdminAccess:
    """Who may call KeyAdmin on this daemon: nobody (``server.key_admin = false``), the
    clients named in ``server.tls.admin_clients``, or (neither set) every client that may
    connect."""

    def __init__(self, server: ServerConfig) -> None:
        self.enabled = server.key_admin
        self.names = server.tls.admin_clients if server.tls else frozenset()
        self.client_certificates = bool(server.tls and server.tls.client_ca)

    def check(self, context: grpc.ServicerContext) -> None:
        """Raises PermissionDenied for a caller this daemon does not let administer keys."""
        if not self.enabled:
            raise PermissionDenied(
                "KeyAdmin is turned off on this daemon (server.key_admin = false); administer "
                "keys with 'hsmsignd keys' on its host, or through a daemon that serves KeyAdmin"
            )
        if self.names:
            common = _auth_values(context, "x509_common_name")
            if not client_names(context) & self.names:
                who = f"certificate {common[0]!r}" if common else "without a certificate name"
                raise PermissionDenied(
                    f"client {who} may not call KeyAdmin (not in server.tls.admin_clients)"
                )

    def exposure(self, address: str) -> str | None:
        """A warning when anyone who reaches ``address`` may administer keys."""
        if not self.enabled or self.client_certificates:
            return None
        host = address.rpartition(":")[0].strip("[]")
        if host in ("127.0.0.1", "::1", "localhost"):
            return None
        return (
            f"KeyAdmin (create, import, destroy keys) is open to every client that reaches "
            f"{address}: no client certificates are required. Set server.key_admin = false, "
            f"or [server.tls] client_ca with admin_clients (docs/operations.md)"
        )


def client_names(context: grpc.ServicerContext) -> frozenset[str]:
    """The caller's client-certificate names: subject CN and subjectAltNames."""
    return frozenset(
        _auth_values(context, "x509_common_name")
        + _auth_values(context, "x509_subject_alternative_name")
    )


def _auth_values(context: grpc.ServicerContext, key: str) -> list[str]:
    # grpc's auth context maps a property name to a list of bytes values.
    values = cast(Iterable[bytes], context.auth_context().get(key, ()))
    return [v.decode(errors="replace") for v in values]


_H = TypeVar("_H", bound=Callable[..., Any])


def _admin(handler: _H) -> _H:
    """Checks the caller against the daemon's AdminAccess before the call does anything."""

    @functools.wraps(handler)
    def wrapper(self: KeyAdminService, request: Any, context: grpc.ServicerContext) -> Any:
        self.access.check(context)
        return handler(self, request, context)

    return wrapper  # type: ignore[return-value]


class KeyAdminService(pb_grpc.KeyAdminServicer):
    """Create, rotate, list, get, set primary, disable, enable, destroy, import."""

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
        return pb.ListKeysResponse(keys=[key_to_pb(k) for k in self.ring.list_keys()])

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
    def ImportKey(self, request: pb.ImportKeyRequest, context: grpc.ServicerContext) -> pb.Key:
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
