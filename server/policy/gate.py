"""The gate every call passes before its handler: identity, then the identity's limits, then
the policy for each key the request names. Default deny: a method missing from ``RPCS`` is
refused, and so is every call before ``install``.

What the caller learns when refused: PERMISSION_DENIED naming the operation and the key as
the request wrote it. The message is the same whether the key exists or not, unless the
caller holds the operation on every key name (then the handler's NOT_FOUND is no leak).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from server.config import Config
from server.errors import ConfigError, InvalidArgument, KeyNotFound, PermissionDenied
from server.identity.identify import Identifier
from server.identity.local import is_local_address
from server.identity.model import (
    Identity,
    current_identity,
    set_current_identity,
)
from server.keyring.model import KeyReference
from server.policy.config import AccessConfig
from server.policy.limits import Limiter, LimitExceeded
from server.policy.model import Operation, Policy


@dataclass(frozen=True)
class KeyCheck:
    """One right a call needs: ``operation`` on the key its request names in ``field`` (a
    KeyRef, or a key-name string for KeyAdmin), when the bool field ``when`` is set (if
    given)."""

    operation: Operation
    field: str | None
    when: str | None = None


@dataclass(frozen=True)
class Decision:
    """One policy check of a call, for the audit: ``operation`` on the key as the request
    wrote it (``None`` for ListKeys), and whether it was allowed."""

    operation: Operation
    key: str | None
    allowed: bool


@dataclass
class CallAccess:
    """What the gate decided for the call being served (``current_access()``)."""

    method: str
    #: None when the caller was not identified (the call then ended UNAUTHENTICATED).
    identity: Identity | None = None
    decisions: list[Decision] = field(default_factory=list)


_access: contextvars.ContextVar[CallAccess | None] = contextvars.ContextVar(
    "hsmsign_access", default=None
)


def current_access() -> CallAccess | None:
    """The gate's record of the call being served in this thread: set when the call enters
    the gate and kept until the next call starts, so that the rpc decorator's ``finally``
    (access log, audit) still sees it after the handler returned or failed."""
    return _access.get()


_O = Operation
#: Every RPC of Signer and KeyAdmin with the rights it needs (tests check it lists them all).
RPCS: dict[str, tuple[KeyCheck, ...]] = {
    "GetPublicKey": (KeyCheck(_O.GET_PUBLIC_KEY, "key"),),
    "SignDigest": (KeyCheck(_O.SIGN_DIGEST, "key"),),
    "SignDigests": (KeyCheck(_O.SIGN_DIGEST, "key"),),
    "SealSessionKey": (KeyCheck(_O.SEAL_SESSION_KEY, "key"),),
    "SignChecksum": (KeyCheck(_O.SIGN_CHECKSUM, "key"),),
    "SignChecksums": (KeyCheck(_O.SIGN_CHECKSUM, "key"),),
    # A bundle seals its session key and signs its checksum.
    "SealBundle": (KeyCheck(_O.SEAL_SESSION_KEY, "key"), KeyCheck(_O.SIGN_CHECKSUM, "key")),
    "UnwrapSessionKey": (KeyCheck(_O.UNWRAP, "key"),),
    "RewrapSessionKey": (KeyCheck(_O.UNWRAP, "from_key"), KeyCheck(_O.REWRAP, "to_key")),
    "CreateKey": (KeyCheck(_O.CREATE, "name"),),
    # Making a version primary is set_primary, whichever call does it.
    "RotateKey": (KeyCheck(_O.ROTATE, "name"), KeyCheck(_O.SET_PRIMARY, "name", "make_primary")),
    "ImportKey": (KeyCheck(_O.IMPORT, "name"), KeyCheck(_O.SET_PRIMARY, "name", "make_primary")),
    # The wrapping key names no key: it is for whoever may import some key.
    "GetImportWrappingKey": (KeyCheck(_O.IMPORT, None),),
    # ListKeys answers only the keys the caller may list (``permits``).
    "ListKeys": (KeyCheck(_O.LIST, None),),
    "GetKey": (KeyCheck(_O.GET, "name"),),
    "SetPrimaryVersion": (KeyCheck(_O.SET_PRIMARY, "name"),),
    "DisableKeyVersion": (KeyCheck(_O.DISABLE, "name"),),
    "EnableKeyVersion": (KeyCheck(_O.ENABLE, "name"),),
    "ScheduleKeyVersionDestruction": (KeyCheck(_O.SCHEDULE_DESTROY, "name"),),
    "CancelKeyVersionDestruction": (KeyCheck(_O.CANCEL_DESTROY, "name"),),
}


def _as_written(request: Any, field: str) -> tuple[str, KeyReference] | None:
    """The key reference of ``request.field`` as the caller wrote it, and its domain value;
    None for a KeyRef that names no key validly (missing, malformed fingerprint)."""
    value = getattr(request, field)
    if isinstance(value, str):
        if not value:
            raise InvalidArgument(f"{field} is required")
        return repr(value), KeyReference(name=value)
    # The one KeyRef validation; imported here because server.api imports this module.
    from server.api.convert import key_reference

    try:
        ref = key_reference(value, field)
    except InvalidArgument:
        # Every Signer handler validates its KeyRefs with the same function before it uses
        # a key, so it refuses this one (after its other argument checks, in its order).
        return None
    which = value.WhichOneof("selector")
    if which == "name":
        return repr(value.name) + (f" version {value.version}" if value.version else ""), ref
    return f"{which} {getattr(value, str(which))!r}", ref


class Gate:
    """Identifies, limits and authorises calls, as the config says."""

    def __init__(
        self, access: AccessConfig, config: Config, address: str, previous: Gate | None = None
    ) -> None:
        """``previous``: the gate this one replaces on a reload (the limits callers have
        used carry over). Raises ConfigError for a listener the config does not allow
        (plaintext beyond this host, or without ``[identities.local]``) and for bad
        certificate files."""
        tls = config.server.tls
        if tls is None:
            if not access.identities.local.enabled:
                raise ConfigError(
                    f"{config.path}: serving without TLS needs [identities.local] enabled = true "
                    "(development, loopback only); otherwise configure [server.tls]"
                )
            if not is_local_address(address):
                raise ConfigError(
                    f"{config.path}: refusing to serve without TLS on {address}: plaintext is "
                    "allowed only on a loopback address or a unix socket; configure [server.tls]"
                )
        self.policy: Policy = access.policy
        self._admin_socket = config.server.admin_listen
        self._identifier = Identifier(
            access.identities, tls.client_ca if tls else None, self._admin_socket
        )
        self._limiter: Limiter = Limiter(
            access.policy, previous=previous._limiter if previous else None
        )

    def _check(
        self, identity: Identity, check: KeyCheck, request: Any, ring: Any, record: CallAccess
    ) -> None:
        op = check.operation
        if check.when is not None and not getattr(request, check.when):
            return
        if check.field is None:
            allowed = self.policy.allows_some_key(identity, op)
            record.decisions.append(Decision(op, None, allowed))
            if not allowed:
                raise PermissionDenied(f"{identity.describe()} may not {op.value} keys")
            return
        found = _as_written(request, check.field)
        if found is None:
            return
        written, ref = found
        name = ref.name
        if name is None:
            # A fingerprint or key_id: its key's name decides. One that names no key is
            # refused like a key the caller has no right on.
            try:
                name = ring.find(ref).name
            except KeyNotFound:
                if self.policy.allows_every_key(identity, op):
                    raise
                name = None
        allowed = name is not None and self.policy.allows(identity, op, name)
        record.decisions.append(Decision(op, written, allowed))
        if not allowed:
            raise PermissionDenied(f"{identity.describe()} may not {op.value} key {written}")

    @contextlib.contextmanager
    def admit(
        self, servicer: Any, method: str, request: Any, context: grpc.ServicerContext
    ) -> Iterator[Identity]:
        """Runs the ``with`` body as the identified caller. Raises Unauthenticated,
        TokenUnavailable, LimitExceeded (with a ``retry-after-ms`` trailer) or
        PermissionDenied."""
        record = CallAccess(method)
        _access.set(record)
        set_current_identity(None)
        identity = self._identifier.identify(context)
        record.identity = identity
        set_current_identity(identity)
        checks = RPCS.get(method)
        if checks is None:
            raise PermissionDenied(f"{method} is not covered by the policy")
        if self._admin_socket is not None:
            on_socket = context.peer().startswith("unix")
            if method in KEY_ADMIN_METHODS and not on_socket:
                raise PermissionDenied(
                    "KeyAdmin is served only on this daemon's admin socket (server.admin_listen)"
                )
            if on_socket and method not in KEY_ADMIN_METHODS:
                raise PermissionDenied(
                    "the admin socket serves only KeyAdmin; call the Signer on server.listen"
                )
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self._limiter.admit(identity))
            except LimitExceeded as e:
                # Keeps what CallGate set (the answered-by mark): setting replaces.
                kept = tuple(context.trailing_metadata() or ())
                retry_after = ("retry-after-ms", str(e.retry_after_ms))
                context.set_trailing_metadata((*kept, retry_after))
                raise
            ring = getattr(servicer, "ring", None)
            for check in checks:
                self._check(identity, check, request, ring, record)
            yield identity

    def permits(self, operation: Operation, key: str) -> bool:
        """Whether the caller of the call being served may do ``operation`` on ``key``."""
        identity = current_identity()
        return identity is not None and self.policy.allows(identity, operation, key)


#: The methods that an admin socket (``server.admin_listen``) takes away from the network
#: (method names are unique across hsmsign's services; tests/unit/test_policy.py checks).
KEY_ADMIN_METHODS: Final = frozenset(
    m.name for m in pb.DESCRIPTOR.services_by_name["KeyAdmin"].methods
)

_installed: Gate | None = None


def installed() -> Gate | None:
    """The gate calls of this process pass now (None before start-up installs one)."""
    return _installed


def install(gate: Gate) -> None:
    """Makes ``gate`` the one every call of this process passes (server.main, at start)."""
    global _installed
    _installed = gate


@contextlib.contextmanager
def admit(
    servicer: Any, method: str, request: Any, context: grpc.ServicerContext
) -> Iterator[Identity]:
    """The installed gate's ``admit``; with none installed every call is refused."""
    if _installed is None:
        raise PermissionDenied("no access policy is loaded in this process")
    with _installed.admit(servicer, method, request, context) as identity:
        yield identity


def permits(operation: Operation, key: str) -> bool:
    return _installed is not None and _installed.permits(operation, key)
