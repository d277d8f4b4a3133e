"""The KeyAdmin gRPC service: the calls security teams make.

Each handler turns the request into domain values, calls ``server.admin`` and answers with the
key as it now is. Errors become status codes in ``server.service.rpc`` (the one mapping).
Nothing here logs key material: ImportKey's key is passed through (wrapped, or in clear only
when server.allow_plaintext_import allows it), never printed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from hsmsign import keyformats
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server import admin, key_import
from server.config import Config, ServerConfig
from server.errors import InvalidArgument, PermissionDenied
from server.keyring import Key, KeyRing, KeyVersion, Purpose, State
from server.rpc import rpc
from server.token import Token

_PURPOSES: dict[pb.KeyPurpose.ValueType, Purpose] = {
    pb.KEY_PURPOSE_SIGN: Purpose.SIGN,
    pb.KEY_PURPOSE_UNWRAP: Purpose.UNWRAP,
}
_PURPOSE_PB = {v: k for k, v in _PURPOSES.items()}
_ALGORITHMS: dict[pb.KeyAlgorithm.ValueType, int] = {
    pb.KEY_ALGORITHM_RSA_2048: 2048,
    pb.KEY_ALGORITHM_RSA_3072: 3072,
    pb.KEY_ALGORITHM_RSA_4096: 4096,
}
_ALGORITHM_PB = {v: k for k, v in _ALGORITHMS.items()}
_STATES: dict[State, pb.KeyVersionState.ValueType] = {
    State.ENABLED: pb.KEY_VERSION_STATE_ENABLED,
    State.DISABLED: pb.KEY_VERSION_STATE_DISABLED,
    State.DESTRUCTION_SCHEDULED: pb.KEY_VERSION_STATE_DESTRUCTION_SCHEDULED,
    State.DESTROYED: pb.KEY_VERSION_STATE_DESTROYED,
}


def _timestamp(t: object) -> Timestamp | None:
    if not isinstance(t, datetime):
        return None
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def version_to_pb(v: KeyVersion) -> pb.KeyVersion:
    destroyed = v.state is State.DESTROYED
    out = pb.KeyVersion(
        version=v.version,
        state=_STATES[v.state],
        fingerprint=v.fingerprint,
        capgo_key_id=v.capgo_key_id,
        provenance=pb.Provenance(
            local=v.info.local,
            never_extractable=v.info.never_extractable,
            always_sensitive=v.info.always_sensitive,
            extractable=v.info.extractable,
            sensitive=v.info.sensitive,
            imported=v.imported,
        )
        if not destroyed
        else pb.Provenance(imported=v.imported),
        spki_pem=keyformats.spki_pem(v.public_key),
        pkcs1_pem=keyformats.pkcs1_pem(v.public_key),
        primary=v.primary,
    )
    created = _timestamp(v.created_at)
    if created is not None:
        out.created_at.CopyFrom(created)
    destroy_at = _timestamp(v.destroy_at)
    if destroy_at is not None and v.state in (State.DESTRUCTION_SCHEDULED, State.DESTROYED):
        out.destroy_at.CopyFrom(destroy_at)
    return out


def key_to_pb(key: Key) -> pb.Key:
    return pb.Key(
        name=key.name,
        purpose=_PURPOSE_PB[key.purpose],
        algorithm=_ALGORITHM_PB.get(key.bits, pb.KEY_ALGORITHM_UNSPECIFIED),
        primary_version=key.primary.version if key.primary else 0,
        versions=[version_to_pb(v) for v in key.versions],
    )


def _purpose(value: int, field: str = "purpose") -> Purpose:
    try:
        return _PURPOSES[pb.KeyPurpose.ValueType(value)]
    except KeyError:
        raise InvalidArgument(
            f"{field} must be KEY_PURPOSE_SIGN or KEY_PURPOSE_UNWRAP (got {value})"
        ) from None


def _bits(value: int) -> int:
    try:
        return _ALGORITHMS[pb.KeyAlgorithm.ValueType(value)]
    except KeyError:
        raise InvalidArgument(
            "algorithm must be KEY_ALGORITHM_RSA_2048, _3072 or _4096 "
            f"(got {value}); Capgo needs RSA-2048"
        ) from None


def _version(value: int) -> int:
    if value == 0:
        raise InvalidArgument("version is required (1, 2, ...)")
    return value


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
        v = admin.create_key(
            self.token, self.ring, request.name, _purpose(request.purpose), _bits(request.algorithm)
        )
        return self._key(v.name)

    @rpc
    @_admin
    def RotateKey(self, request: pb.RotateKeyRequest, context: grpc.ServicerContext) -> pb.Key:
        v = admin.rotate_key(self.ring, request.name, request.make_primary)
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
        return key_to_pb(admin.set_primary(self.ring, request.name, _version(request.version)))

    @rpc
    @_admin
    def DisableKeyVersion(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return key_to_pb(admin.disable_version(self.ring, request.name, _version(request.version)))

    @rpc
    @_admin
    def EnableKeyVersion(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return key_to_pb(admin.enable_version(self.ring, request.name, _version(request.version)))

    @rpc
    @_admin
    def ScheduleKeyVersionDestruction(
        self, request: pb.ScheduleDestructionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        delay = (
            timedelta(seconds=request.delay.seconds, microseconds=request.delay.nanos // 1000)
            if request.HasField("delay")
            else None
        )
        return key_to_pb(
            admin.schedule_destruction(self.ring, request.name, _version(request.version), delay)
        )

    @rpc
    @_admin
    def CancelKeyVersionDestruction(
        self, request: pb.KeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.Key:
        return key_to_pb(
            admin.cancel_destruction(self.ring, request.name, _version(request.version))
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
                _purpose(request.purpose),
                request.wrapped,
                request.make_primary,
            )
            return self._key(v.name)
        key_import.check_plaintext_import_allowed(self.config.server, context.peer())
        if not request.private_key_der:
            raise InvalidArgument("private_key_der is empty")
        v = admin.import_key(
            self.ring,
            request.name,
            _purpose(request.purpose),
            request.private_key_der,
            request.make_primary,
        )
        return self._key(v.name)
