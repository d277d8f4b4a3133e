"""The key ring: key names, versions, the primary version and version states.

Each key version is one RSA key pair in the token whose objects carry the label
``hsmsign:<name>:v<version>`` and a random 16-byte CKA_ID. The ring is derived from the
token's objects (so every daemon on the same token agrees, without a restart) and re-read at
most every ``keyring.refresh_seconds``, or at once when a request names something unknown.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import keyformats
from server.config import Config
from server.errors import FailedPrecondition, InvalidArgument, KeyNotFound
from server.token import KeyObjectInfo, Token

log = logging.getLogger(__name__)

LABEL_PREFIX = "hsmsign:"
_LABEL_RE = re.compile(
    r"^hsmsign:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63}):v(?P<version>[1-9][0-9]{0,8})$"
)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALLOWED_BITS = (2048, 3072, 4096)


class Purpose(Enum):
    SIGN = "sign"
    UNWRAP = "unwrap"


class State(Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTRUCTION_SCHEDULED = "destruction-scheduled"


def version_label(name: str, version: int) -> str:
    return f"{LABEL_PREFIX}{name}:v{version}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


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

    @property
    def primary(self) -> KeyVersion | None:
        return next((v for v in self.versions if v.primary), None)


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


@dataclass
class _Snapshot:
    keys: dict[str, Key] = field(default_factory=dict)
    loaded_at: float = 0.0


def _purpose(info: KeyObjectInfo) -> Purpose | None:
    if info.can_sign and not (info.can_decrypt or info.can_unwrap):
        return Purpose.SIGN
    if (info.can_decrypt or info.can_unwrap) and not info.can_sign:
        return Purpose.UNWRAP
    return None


def build_keys(objects: list[KeyObjectInfo]) -> dict[str, Key]:
    """Groups the token's key objects into keys; the highest version is primary."""
    grouped: dict[str, list[KeyVersion]] = {}
    for info in objects:
        m = _LABEL_RE.match(info.label)
        if not m:
            continue
        purpose = _purpose(info)
        if purpose is None:
            log.warning("ignoring %s: it is allowed both to sign and to decrypt", info.label)
            continue
        pub = keyformats.public_key_from_numbers(info.modulus, info.public_exponent)
        grouped.setdefault(m["name"], []).append(
            KeyVersion(
                name=m["name"],
                version=int(m["version"]),
                purpose=purpose,
                info=info,
                public_key=pub,
                fingerprint=keyformats.fingerprint(pub),
                capgo_key_id=keyformats.capgo_key_id(pub),
                imported=not info.local,
            )
        )
    keys: dict[str, Key] = {}
    for name, versions in grouped.items():
        versions.sort(key=lambda v: v.version)
        top = versions[-1].version
        marked = tuple(KeyVersion(**{**v.__dict__, "primary": v.version == top}) for v in versions)
        keys[name] = Key(name=name, purpose=marked[-1].purpose, versions=marked)
    return keys


class KeyRing:
    """Resolves key references to versions; thread-safe; refreshes from the token."""

    def __init__(self, token: Token, config: Config) -> None:
        self._token = token
        self._config = config
        self._snapshot = _Snapshot()
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        with self._token.session("reading the key ring") as s:
            objects = s.find_key_objects(LABEL_PREFIX)
        keys = build_keys(objects)
        self._snapshot = _Snapshot(keys=keys, loaded_at=time.monotonic())

    def _current(self) -> Mapping[str, Key]:
        snap = self._snapshot
        if (
            time.monotonic() - snap.loaded_at > self._config.keyring.refresh_seconds
            and self._lock.acquire(blocking=False)
        ):
            try:
                self.refresh()
            finally:
                self._lock.release()
        return self._snapshot.keys

    def list_keys(self) -> list[Key]:
        return sorted(self._current().values(), key=lambda k: k.name)

    def get(self, name: str) -> Key:
        key = self._current().get(name)
        if key is None:
            with self._lock:
                self.refresh()
            key = self._snapshot.keys.get(name)
        if key is None:
            raise KeyNotFound(f"no key named {name!r} in token {self._token.label!r}")
        return key

    def find(self, ref: KeyReference) -> KeyVersion:
        """The version a reference names, whatever its state. Raises KeyNotFound."""
        version = self._find(ref)
        if version is None:
            with self._lock:
                self.refresh()
            version = self._find(ref)
        if version is None:
            raise KeyNotFound(f"no {ref.describe()} in token {self._token.label!r}")
        return version

    def resolve(self, ref: KeyReference, purpose: Purpose) -> KeyVersion:
        """The version a request uses for ``purpose``. Raises KeyNotFound or FailedPrecondition."""
        version = self.find(ref)
        if version.purpose is not purpose:
            raise FailedPrecondition(
                f"{version.describe()} is a {version.purpose.value} key; this call needs a "
                f"{purpose.value} key"
            )
        if version.state is not State.ENABLED:
            raise FailedPrecondition(f"{version.describe()} is {version.state.value}")
        return version

    def _find(self, ref: KeyReference) -> KeyVersion | None:
        keys = self._current()
        if ref.name is not None:
            key = keys.get(ref.name)
            if key is None:
                return None
            if ref.version == 0:
                return key.primary
            return next((v for v in key.versions if v.version == ref.version), None)
        matches = [
            v
            for k in keys.values()
            for v in k.versions
            if (ref.fingerprint is not None and v.fingerprint == ref.fingerprint.lower())
            or (ref.capgo_key_id is not None and v.capgo_key_id == ref.capgo_key_id)
        ]
        if len(matches) > 1:
            found = ", ".join(f"{v.name} v{v.version}" for v in matches)
            raise FailedPrecondition(
                f"{ref.describe()} is ambiguous (matches {found}); name the key and version"
            )
        return matches[0] if matches else None
