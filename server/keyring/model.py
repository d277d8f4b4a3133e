"""The key ring's domain model: keys, versions, references, purposes and states. Pure values.

A key has a name, one purpose and numbered versions; each version is one RSA key pair in the
token, labelled ``hsmsign:<name>:v<version>``, and has a state. A request names a key by name
(and optionally a version), by fingerprint, or by Capgo key_id (``KeyReference``).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Final

from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import keyformats, names
from server.errors import InvalidArgument, KeyNotFound
from server.pkcs11.objects import KeyObjectInfo

#: Every key object hsmsign manages has a label starting with this.
LABEL_PREFIX: Final = "hsmsign:"
#: A key name: what ``check_name`` accepts.
NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: A key version's label: ``hsmsign:<name>:v<version>``.
LABEL_RE: Final = re.compile(
    r"^hsmsign:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63}):v(?P<version>[1-9][0-9]{0,8})$"
)
#: RSA sizes hsmsign generates and imports: the sizes of the KeyAlgorithm vocabulary rows.
ALLOWED_BITS: Final = tuple(row.bits for row in names.KEY_ALGORITHMS)


# The values of Purpose and State are the names of hsmsign.names.PURPOSES and
# KEY_VERSION_STATES rows; their pb values are looked up there by name (server.api.convert).
class Purpose(Enum):
    SIGN = "sign"
    UNWRAP = "unwrap"


class State(Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTRUCTION_SCHEDULED = "destruction-scheduled"
    DESTROYED = "destroyed"


#: A version whose number is reserved in the state while its key pair is being made.
PENDING: Final = "pending"


def version_label(name: str, version: int) -> str:
    """The CKA_LABEL of a key version's objects."""
    return f"{LABEL_PREFIX}{name}:v{version}"


def check_name(name: str) -> str:
    """Returns ``name``; raises InvalidArgument when it is not a valid key name."""
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def now_utc() -> datetime:
    """The current time in UTC, to the second (what the state document records)."""
    return datetime.now(UTC).replace(microsecond=0)


def spki_b64(public_key: rsa.RSAPublicKey) -> str:
    """The base64 DER SubjectPublicKeyInfo the state document keeps for a version."""
    return base64.b64encode(keyformats.spki_der(public_key)).decode()


@dataclass(frozen=True)
class KeyVersion:
    """One version of a key: a key pair in the token, with what the token says of it."""

    name: str
    version: int
    purpose: Purpose
    info: KeyObjectInfo
    public_key: rsa.RSAPublicKey
    fingerprint: str
    capgo_key_id: str
    state: State = State.ENABLED
    primary: bool = False
    created_at: datetime | None = None
    destroy_at: datetime | None = None
    imported: bool = False
    #: Why this version may not be used even though its state allows it (extractable key).
    refused: str | None = None
    #: Whether its key objects are in the token (False: destroyed, listed from the state).
    has_objects: bool = True

    @property
    def bits(self) -> int:
        return self.public_key.key_size

    @property
    def cka_id(self) -> bytes:
        return self.info.cka_id

    def describe(self) -> str:
        return f"key {self.name!r} version {self.version}"


@dataclass(frozen=True)
class Key:
    name: str
    purpose: Purpose
    versions: tuple[KeyVersion, ...]
    bits: int = 2048

    @property
    def primary(self) -> KeyVersion | None:
        return next((v for v in self.versions if v.primary), None)

    def version(self, n: int) -> KeyVersion:
        """Version ``n``; raises KeyNotFound when the key has none."""
        v = next((v for v in self.versions if v.version == n), None)
        if v is None:
            raise KeyNotFound(f"key {self.name!r} has no version {n}")
        return v


@dataclass(frozen=True)
class KeyReference:
    """What a request names: a name (and optionally a version), a fingerprint or a key_id."""

    name: str | None = None
    version: int = 0
    fingerprint: str | None = None
    capgo_key_id: str | None = None

    def describe(self) -> str:
        if self.name is not None:
            return f"key {self.name!r}" + (f" version {self.version}" if self.version else "")
        if self.fingerprint is not None:
            return f"key with fingerprint {self.fingerprint}"
        return f"key with Capgo key_id {self.capgo_key_id}"
