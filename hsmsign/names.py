"""The vocabulary of hsmsign: one table per concept, CLI name <-> protobuf enum.

Shared, I/O-free: the client, the CLI and the daemon all read these tables; nothing else
spells these names. Each table is a tuple of rows; lookups by CLI name or by enum value go
through the helpers below, which raise :class:`UnknownName` listing what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from hsmsign.v1 import hsmsign_pb2 as pb

E = TypeVar("E", bound=int, covariant=True)
R = TypeVar("R", bound="Named[int]")


class UnknownName(ValueError):
    """A name or enum value that is not in a vocabulary table; ``str()`` lists the choices."""


@dataclass(frozen=True)
class Named(Generic[E]):
    """One row: the CLI/library name and the protobuf enum value."""

    name: str
    pb: E


@dataclass(frozen=True)
class SignatureAlgorithm(Named[pb.SignatureAlgorithm.ValueType]):
    hash_name: str  # hashlib name of the digest the algorithm signs
    pss: bool  # RSASSA-PSS (salt = hash length, MGF1 with the same hash); else PKCS#1 v1.5


@dataclass(frozen=True)
class KeyAlgorithm(Named[pb.KeyAlgorithm.ValueType]):
    bits: int


@dataclass(frozen=True)
class UnwrapScheme(Named[pb.UnwrapScheme.ValueType]):
    #: Whether ``unwrap rewrap`` may wrap to it (PKCS#1 v1.5 is accepted only to unwrap).
    wrap_target: bool


SIGNATURE_ALGORITHMS: Final = (
    SignatureAlgorithm(
        "rsa-pkcs1-sha256", pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256, "sha256", False
    ),
    SignatureAlgorithm(
        "rsa-pkcs1-sha384", pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA384, "sha384", False
    ),
    SignatureAlgorithm(
        "rsa-pkcs1-sha512", pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512, "sha512", False
    ),
    SignatureAlgorithm("rsa-pss-sha256", pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256, "sha256", True),
    SignatureAlgorithm("rsa-pss-sha384", pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA384, "sha384", True),
    SignatureAlgorithm("rsa-pss-sha512", pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA512, "sha512", True),
)
DEFAULT_SIGNATURE_ALGORITHM: Final = "rsa-pkcs1-sha256"

KEY_ALGORITHMS: Final = (
    KeyAlgorithm("rsa-2048", pb.KEY_ALGORITHM_RSA_2048, 2048),
    KeyAlgorithm("rsa-3072", pb.KEY_ALGORITHM_RSA_3072, 3072),
    KeyAlgorithm("rsa-4096", pb.KEY_ALGORITHM_RSA_4096, 4096),
)
DEFAULT_KEY_ALGORITHM: Final = "rsa-2048"

UNWRAP_SCHEMES: Final = (
    UnwrapScheme("rsa-oaep-sha256", pb.UNWRAP_SCHEME_RSA_OAEP_SHA256, True),
    UnwrapScheme("rsa-oaep-sha1", pb.UNWRAP_SCHEME_RSA_OAEP_SHA1, True),
    UnwrapScheme("rsa-pkcs1v15", pb.UNWRAP_SCHEME_RSA_PKCS1_V15, False),
)
DEFAULT_UNWRAP_SCHEME: Final = "rsa-oaep-sha256"

#: Capgo signed-checksum formats: v3 (raw digest, hex) and v2 (older plugins, base64).
CHECKSUM_FORMATS: Final = (
    Named[pb.ChecksumFormat.ValueType]("v3", pb.CHECKSUM_FORMAT_V3),
    Named[pb.ChecksumFormat.ValueType]("v2", pb.CHECKSUM_FORMAT_V2),
)
DEFAULT_CHECKSUM_FORMAT: Final = "v3"

PURPOSES: Final = (
    Named[pb.KeyPurpose.ValueType]("sign", pb.KEY_PURPOSE_SIGN),
    Named[pb.KeyPurpose.ValueType]("unwrap", pb.KEY_PURPOSE_UNWRAP),
)
DEFAULT_PURPOSE: Final = "sign"

KEY_VERSION_STATES: Final = (
    Named[pb.KeyVersionState.ValueType]("enabled", pb.KEY_VERSION_STATE_ENABLED),
    Named[pb.KeyVersionState.ValueType]("disabled", pb.KEY_VERSION_STATE_DISABLED),
    Named[pb.KeyVersionState.ValueType](
        "destruction-scheduled", pb.KEY_VERSION_STATE_DESTRUCTION_SCHEDULED
    ),
    Named[pb.KeyVersionState.ValueType]("destroyed", pb.KEY_VERSION_STATE_DESTROYED),
)

#: Trailing metadata hsmsignd puts on every answer (server.api.dispatch): a status
#: without it came from the client's own transport (no connection, connection lost), so
#: hsmsign.connection tells "cannot reach hsmsignd" from the daemon's own refusal.
ANSWERED_BY: Final = ("hsmsign-answered-by", "hsmsignd")

#: What tables and JSON print for an enum value that is in no table (0, or newer than us).
UNSPECIFIED: Final = "unspecified"


def names(table: Sequence[Named[int]]) -> list[str]:
    """The CLI names of a table, in table order (for argparse ``choices``)."""
    return [row.name for row in table]


def by_name(table: Sequence[R], name: str, what: str) -> R:
    """The row called ``name``. Raises UnknownName listing the allowed names."""
    for row in table:
        if row.name == name:
            return row
    raise UnknownName(f"unknown {what} {name!r}; choose from {', '.join(names(table))}")


def by_pb(table: Sequence[R], value: int) -> R | None:
    """The row for a protobuf enum value, or None (unspecified or unknown)."""
    for row in table:
        if row.pb == value:
            return row
    return None


def name_of(table: Sequence[Named[int]], value: int) -> str:
    """The CLI name of an enum value, or ``unspecified``."""
    row = by_pb(table, value)
    return row.name if row is not None else UNSPECIFIED
