"""The policy: grants of operations on keys to identities. Pure: no I/O, no gRPC.

Default deny: an operation is allowed only when a grant names the identity, its claims
match, the operation is among the grant's operations and the key name matches one of its
key patterns. Patterns are shell globs (``fnmatch``, case-sensitive: ``*``, ``?``, ``[..]``).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from types import MappingProxyType

from server.identity.model import Identity


class Operation(enum.StrEnum):
    """The rights a grant gives, one per thing a caller can do to a key."""

    GET_PUBLIC_KEY = "get_public_key"
    SIGN_DIGEST = "sign_digest"
    #: Capgo's raw RSA operations (private-key "encryption" of a session key and of a
    #: checksum) are rights of their own, separate from digest signing.
    SEAL_SESSION_KEY = "seal_session_key"
    SIGN_CHECKSUM = "sign_checksum"
    UNWRAP = "unwrap"
    #: Rewrap TO this key (RewrapSessionKey also needs ``unwrap`` on the source key).
    REWRAP = "rewrap"
    CREATE = "create"
    ROTATE = "rotate"
    IMPORT = "import"
    SET_PRIMARY = "set_primary"
    DISABLE = "disable"
    ENABLE = "enable"
    SCHEDULE_DESTROY = "schedule_destroy"
    CANCEL_DESTROY = "cancel_destroy"
    LIST = "list"
    GET = "get"


#: ``operations = ["*"]`` in a grant: every operation.
ALL_OPERATIONS = frozenset(Operation)


@dataclass(frozen=True)
class Grant:
    """``[[policy.grant]]``: ``identities`` may do ``operations`` on keys named by ``keys``."""

    #: Identity names (mTLS rule names, OIDC issuer names, "local"); "*" is any identity.
    identities: tuple[str, ...]
    #: Key name globs.
    keys: tuple[str, ...]
    operations: frozenset[Operation]
    #: Claims the caller's token must carry, each value matching the glob (OIDC only: a
    #: grant with claims never matches an mTLS or local identity).
    claims: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def admits(self, identity: Identity) -> bool:
        if "*" not in self.identities and identity.name not in self.identities:
            return False
        return all(
            name in identity.claims and fnmatchcase(identity.claims[name], pattern)
            for name, pattern in self.claims.items()
        )


@dataclass(frozen=True)
class Limit:
    """How much one identity may ask of one serving process (``None``: no limit)."""

    #: Calls per second, sustained.
    rate: float | None = None
    #: Calls allowed at once above the rate (the token bucket's size); default: the rate.
    burst: float | None = None
    #: Calls in flight at once.
    concurrent: int | None = None


@dataclass(frozen=True)
class Policy:
    """``[policy]``: the grants, and the per-identity limits."""

    grants: tuple[Grant, ...] = ()
    #: The limit of every identity without its own entry in ``limits``.
    default_limit: Limit = Limit()
    #: Limits by identity name.
    limits: Mapping[str, Limit] = field(default_factory=lambda: MappingProxyType({}))

    def allows(self, identity: Identity, operation: Operation, key: str) -> bool:
        """True when a grant gives ``identity`` the ``operation`` on the key named ``key``."""
        return any(
            operation in g.operations
            and g.admits(identity)
            and any(fnmatchcase(key, p) for p in g.keys)
            for g in self.grants
        )

    def allows_every_key(self, identity: Identity, operation: Operation) -> bool:
        """True when ``identity`` has ``operation`` on every key name (a ``*`` pattern): such
        a caller may learn that a key does not exist."""
        return any(
            operation in g.operations and g.admits(identity) and "*" in g.keys for g in self.grants
        )

    def allows_some_key(self, identity: Identity, operation: Operation) -> bool:
        return any(operation in g.operations and g.admits(identity) for g in self.grants)

    def limit_for(self, identity: Identity) -> Limit:
        return self.limits.get(identity.name, self.default_limit)
