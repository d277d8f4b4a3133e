"""The key ring: key names, versions, the primary version and version states.

Each key version is one RSA key pair in the token whose objects carry the label
``hsmsign:<name>:v<version>`` and a random 16-byte CKA_ID. What the objects cannot say (the
primary version, disabled and scheduled states, creation time, whether a version was imported,
the public key of a destroyed version) lives in the token too, in one CKO_DATA object
(application ``hsmsign``, label ``hsmsign:keyring``) holding JSON with a generation number.
Every daemon on the same token therefore agrees without a restart: every
``keyring.refresh_seconds`` a daemon reads the state object, and reads the key objects again
when the state changed, when a destruction falls due, and at least every
``FULL_SCAN_SECONDS``; at once when a request names something unknown. The choice and its
residual race are written down in docs/adr/0002-key-ring-state.md.

A data object's value cannot be changed (docs/design-facts.md, fact 7), so a write creates the next
generation, then destroys the older ones; readers take the highest generation.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import keyformats
from server.audit import trail as audit
from server.config import Config
from server.errors import (
    FailedPrecondition,
    InvalidArgument,
    KeyNotFound,
    ServerError,
    StartupError,
)
from server.token import KeyObjectInfo, Session, Token

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_PREFIX = "hsmsign:"
_LABEL_RE = re.compile(
    r"^hsmsign:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63}):v(?P<version>[1-9][0-9]{0,8})$"
)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALLOWED_BITS = (2048, 3072, 4096)

#: Where the ring state lives: a CKO_DATA object with this application and label.
STATE_APPLICATION = "hsmsign"
STATE_LABEL = "hsmsign:keyring"
STATE_FORMAT = 1
#: Attempts at a state write that keeps colliding with another process's write.
_WRITE_ATTEMPTS = 8


class Purpose(Enum):
    SIGN = "sign"
    UNWRAP = "unwrap"


class State(Enum):
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTRUCTION_SCHEDULED = "destruction-scheduled"
    DESTROYED = "destroyed"


#: A version whose number is reserved in the state while its key pair is being made.
PENDING = "pending"


def version_label(name: str, version: int) -> str:
    return f"{LABEL_PREFIX}{name}:v{version}"


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid key name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _parse_time(s: Any) -> datetime | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


# -- the state kept in the token ------------------------------------------------------------


@dataclass
class VersionRecord:
    """What the state object says of one version (the objects say the rest)."""

    state: str
    cka_id: str = ""
    spki: str = ""  # base64 DER SubjectPublicKeyInfo: lets a destroyed version stay listed
    created_at: datetime | None = None
    destroy_at: datetime | None = None
    imported: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "cka_id": self.cka_id,
            "spki": self.spki,
            "created_at": _iso(self.created_at),
            "destroy_at": _iso(self.destroy_at),
            "imported": self.imported,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VersionRecord:
        return cls(
            state=str(d.get("state", State.ENABLED.value)),
            cka_id=str(d.get("cka_id", "")),
            spki=str(d.get("spki", "")),
            created_at=_parse_time(d.get("created_at")),
            destroy_at=_parse_time(d.get("destroy_at")),
            imported=bool(d.get("imported", False)),
        )


@dataclass
class KeyRecord:
    purpose: str
    bits: int
    primary: int = 0
    versions: dict[int, VersionRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose,
            "bits": self.bits,
            "primary": self.primary,
            "versions": {str(n): v.to_json() for n, v in sorted(self.versions.items())},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KeyRecord:
        return cls(
            purpose=str(d.get("purpose", Purpose.SIGN.value)),
            bits=int(d.get("bits", 2048)),
            primary=int(d.get("primary", 0)),
            versions={int(n): VersionRecord.from_json(v) for n, v in d.get("versions", {}).items()},
        )


@dataclass
class RingState:
    """The whole ring state: one JSON document in one CKO_DATA object per generation."""

    generation: int = 0
    writer: str = ""
    keys: dict[str, KeyRecord] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "generation": self.generation,
                "writer": self.writer,
                "keys": {n: k.to_json() for n, k in sorted(self.keys.items())},
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RingState:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise ValueError("unknown key-ring state format")
        return cls(
            generation=int(d["generation"]),
            writer=str(d.get("writer", "")),
            keys={n: KeyRecord.from_json(k) for n, k in d.get("keys", {}).items()},
        )


def _read_states(s: Session) -> list[tuple[Any, RingState]]:
    out = []
    for obj, label, value in s.data_objects(STATE_APPLICATION):
        if label != STATE_LABEL:
            continue
        try:
            out.append((obj, RingState.from_bytes(value)))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable key-ring state object in the token")
    return out


def _best(states: list[tuple[Any, RingState]]) -> RingState:
    """The current state: highest generation; on a tie, the smallest writer id (every reader
    picks the same one)."""
    if not states:
        return RingState()
    return min((st for _obj, st in states), key=lambda st: (-st.generation, st.writer))


# -- the ring as requests see it ------------------------------------------------------------


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


#: The background check reads the key objects again at least this often even when the state
#: document did not change: objects created or destroyed by other tools than hsmsign show up
#: within this time (a request naming an unknown key re-reads at once anyway).
FULL_SCAN_SECONDS = 60.0


@dataclass
class _Snapshot:
    keys: dict[str, Key] = field(default_factory=dict)
    #: When the ring was last known to be current (monotonic).
    loaded_at: float = 0.0
    #: The state document the keys were built from, and when the key objects were read.
    state: RingState | None = None
    scanned_at: float = 0.0


def _due(keys: Mapping[str, Key], state: RingState) -> list[KeyVersion]:
    """Versions whose destruction is due: scheduled with its time past, or destroyed in the
    state while its objects are still there (a destruction that was cut short)."""
    now = now_utc()
    due = []
    for name, rec in state.keys.items():
        key = keys.get(name)
        if key is None:
            continue
        for v in key.versions:
            vr = rec.versions.get(v.version)
            if vr is None:
                continue
            scheduled_due = (
                vr.state == State.DESTRUCTION_SCHEDULED.value
                and vr.destroy_at is not None
                and vr.destroy_at <= now
            )
            has_objects = v.info.can_sign or v.info.can_decrypt or v.info.can_unwrap
            unfinished = vr.state == State.DESTROYED.value and has_objects
            if scheduled_due or unfinished:
                due.append(v)
    return due


def _purpose(info: KeyObjectInfo) -> Purpose | None:
    if info.can_sign and not (info.can_decrypt or info.can_unwrap):
        return Purpose.SIGN
    if (info.can_decrypt or info.can_unwrap) and not info.can_sign:
        return Purpose.UNWRAP
    return None


def spki_b64(public_key: rsa.RSAPublicKey) -> str:
    return base64.b64encode(keyformats.spki_der(public_key)).decode()


def _public_key_from_spki(b64: str) -> rsa.RSAPublicKey | None:
    try:
        pk = serialization.load_der_public_key(base64.b64decode(b64))
    except ValueError:
        return None
    return pk if isinstance(pk, rsa.RSAPublicKey) else None


def _objects_by_version(objects: list[KeyObjectInfo]) -> dict[str, dict[int, KeyObjectInfo]]:
    out: dict[str, dict[int, KeyObjectInfo]] = {}
    for info in objects:
        m = _LABEL_RE.match(info.label)
        if m:
            out.setdefault(m["name"], {})[int(m["version"])] = info
    return out


def adopt(state: RingState, objects: list[KeyObjectInfo]) -> None:
    """Records in ``state`` the versions found in the token that it does not know yet
    (keys made outside hsmsign that follow the label scheme, or pending reservations whose
    key pair now exists), so that they stay listed after their objects are destroyed."""
    for name, versions in _objects_by_version(objects).items():
        for n, info in versions.items():
            purpose = _purpose(info)
            if purpose is None:
                continue
            pub = keyformats.public_key_from_numbers(info.modulus, info.public_exponent)
            rec = state.keys.get(name)
            if rec is None:
                rec = state.keys[name] = KeyRecord(purpose=purpose.value, bits=pub.key_size)
            vr = rec.versions.get(n)
            if vr is None:
                vr = rec.versions[n] = VersionRecord(state=State.ENABLED.value)
            if vr.state == PENDING:
                vr.state = State.ENABLED.value
            vr.cka_id = info.cka_id.hex()
            vr.spki = spki_b64(pub)
            if vr.created_at is None:
                vr.created_at = now_utc()
        rec = state.keys.get(name)
        if rec is not None and rec.primary not in rec.versions:
            live = [n for n, v in rec.versions.items() if v.state == State.ENABLED.value]
            rec.primary = max(live, default=0)


def build_keys(
    objects: list[KeyObjectInfo], state: RingState, config: Config | None = None
) -> dict[str, Key]:
    """Joins the token's key objects with the ring state into keys.

    A version with objects but no record is enabled; a version whose objects are gone is
    destroyed (whatever its record said); a key with no recorded primary uses its highest
    enabled version.
    """
    found = _objects_by_version(objects)
    keys: dict[str, Key] = {}
    for name in sorted(set(found) | set(state.keys)):
        rec = state.keys.get(name)
        objs = found.get(name, {})
        numbers = sorted(set(objs) | set(rec.versions if rec else ()))
        key_purpose = Purpose(rec.purpose) if rec else None
        options = config.key_options(name) if config else None
        versions: list[KeyVersion] = []
        for n in numbers:
            vr = rec.versions.get(n) if rec else None
            info = objs.get(n)
            if info is None:
                if vr is None or vr.state == PENDING:
                    continue
                pub = _public_key_from_spki(vr.spki)
                if pub is None:
                    continue
                nums = pub.public_numbers()
                info = KeyObjectInfo(
                    cka_id=bytes.fromhex(vr.cka_id),
                    label=version_label(name, n),
                    modulus=nums.n,
                    public_exponent=nums.e,
                    can_sign=False,
                    can_decrypt=False,
                    can_unwrap=False,
                    local=False,
                    never_extractable=False,
                    always_sensitive=False,
                    extractable=False,
                    sensitive=False,
                )
                purpose = key_purpose or Purpose.SIGN
                state_ = State.DESTROYED
            else:
                found_purpose = _purpose(info)
                if found_purpose is None:
                    log.warning("ignoring %s: it may both sign and decrypt", info.label)
                    continue
                if key_purpose is not None and found_purpose is not key_purpose:
                    log.warning(
                        "ignoring %s: it is a %s key but key %r is for %s",
                        info.label,
                        found_purpose.value,
                        name,
                        key_purpose.value,
                    )
                    continue
                key_purpose = key_purpose or found_purpose
                purpose = found_purpose
                pub = keyformats.public_key_from_numbers(info.modulus, info.public_exponent)
                state_ = (
                    State(vr.state) if vr is not None and vr.state != PENDING else State.ENABLED
                )
            refused = None
            if info.extractable and not (options and options.allow_extractable):
                refused = (
                    f"key {name!r} version {n} is refused: the token reports its private key "
                    f"as extractable (set [keys.{name}] allow_extractable = true to accept it)"
                )
            versions.append(
                KeyVersion(
                    name=name,
                    version=n,
                    purpose=purpose,
                    info=info,
                    public_key=pub,
                    fingerprint=keyformats.fingerprint(pub),
                    capgo_key_id=keyformats.capgo_key_id(pub),
                    state=state_,
                    created_at=vr.created_at if vr else None,
                    destroy_at=vr.destroy_at if vr else None,
                    imported=vr.imported if vr else not info.local,
                    refused=refused,
                )
            )
        if not versions or key_purpose is None:
            continue
        usable = [v.version for v in versions if v.state is State.ENABLED]
        if rec is not None and rec.primary in usable:
            primary = rec.primary
        else:
            primary = max(usable, default=0)
        marked = tuple(
            KeyVersion(**{**v.__dict__, "primary": v.version == primary}) for v in versions
        )
        bits = rec.bits if rec else marked[-1].bits
        keys[name] = Key(name=name, purpose=key_purpose, versions=marked, bits=bits)
    return keys


class ChangeCounter(Protocol):
    """A counter shared by a daemon's serving processes (server.supervisor.SharedCounter)."""

    def read(self) -> int: ...

    def bump(self) -> int:
        """Adds one; returns the new value."""
        ...

    def objects_exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Held while reading or changing the token's objects; one process at a time."""
        ...


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


class KeyRing:
    """Resolves key references to versions; thread-safe; refreshes from the token.

    ``update`` is the one way to change the ring state (admin calls and scheduled
    destruction go through it).
    """

    def __init__(self, token: Token, config: Config, siblings: ChangeCounter | None = None) -> None:
        self._token = token
        self._config = config
        # Serving processes of one daemon share a counter that each bumps after changing the
        # ring, so a sibling re-reads before its next request (read-your-writes across them).
        self._siblings = siblings
        self._seen_change = siblings.read() if siblings else 0
        self._snapshot = _Snapshot()
        self._lock = threading.RLock()  # guards reading + installing a snapshot
        self._write_lock = threading.RLock()  # one state writer per process
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refresh()

    @property
    def token(self) -> Token:
        return self._token

    @property
    def config(self) -> Config:
        return self._config

    def objects_exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold while reading or changing the token's key objects: the daemon's other serving
        processes wait (SoftHSM2 fails reads that race with creation or destruction in another
        process). A no-op for a daemon serving from one process."""
        if self._siblings is None:
            return contextlib.nullcontext()
        return self._siblings.objects_exclusive()

    # -- reading --------------------------------------------------------------------------

    def _reload(self) -> list[KeyVersion]:
        """Re-reads objects and state; installs the snapshot; returns versions now due for
        destruction. Call with ``_lock`` held."""
        with self.objects_exclusive(), self._token.session("reading the key ring") as s:
            objects = s.find_key_objects(LABEL_PREFIX)
            state = _best(_read_states(s))
        keys = build_keys(objects, state, self._config)
        now_mono = time.monotonic()
        self._snapshot = _Snapshot(keys=keys, loaded_at=now_mono, state=state, scanned_at=now_mono)
        return _due(keys, state)

    def _check(self) -> None:
        """The background refresh. Reading every key object holds a session and the GIL for
        a time that grows with the number of versions (4.3 ms of CPU for three key pairs),
        in every serving process every refresh_seconds. This reads only the state document
        (0.6 ms), which every change hsmsign makes writes anew, and reads the objects again
        when it changed, when a destruction falls due, or when the last full read is
        FULL_SCAN_SECONDS old."""
        with self._lock:
            snap = self._snapshot
            sibling_change = self._siblings.read() if self._siblings is not None else 0
            if (
                snap.state is not None
                and sibling_change == self._seen_change
                and time.monotonic() - snap.scanned_at < FULL_SCAN_SECONDS
            ):
                with self.objects_exclusive(), self._token.session("reading the key ring") as s:
                    state = _best(_read_states(s))
                same = (state.generation, state.writer) == (
                    snap.state.generation,
                    snap.state.writer,
                )
                if same and not _due(snap.keys, snap.state):
                    self._snapshot = _Snapshot(
                        keys=snap.keys,
                        loaded_at=time.monotonic(),
                        state=snap.state,
                        scanned_at=snap.scanned_at,
                    )
                    return
        self.refresh()

    def refresh(self, only_if_siblings_changed: bool = False) -> None:
        """Re-reads the ring from the token, then destroys versions whose time has come.

        ``only_if_siblings_changed``: only if another serving process of this daemon changed
        the ring since this process last read it (threads that waited for the lock while one
        of them re-read return at once)."""
        with self._lock:
            if self._siblings is not None:
                change = self._siblings.read()
                if only_if_siblings_changed and change == self._seen_change:
                    return
                self._seen_change = change
            due = self._reload()
        if due:
            self._destroy_due(due)

    def _destroy_due(self, due: list[KeyVersion]) -> None:
        with self._write_lock:
            for v in due:
                with (
                    self.objects_exclusive(),
                    self._token.session(f"destroying {v.describe()}") as s,
                ):
                    n = s.destroy_key_objects(v.cka_id)
                log.warning(
                    "destroyed %s (sha256:%s): %d token objects removed as scheduled",
                    v.describe(),
                    v.fingerprint,
                    n,
                )
                audit.event(
                    "DestroyKeyVersion",
                    key=v.name,
                    version=v.version,
                    fingerprint=v.fingerprint,
                    outcome="ok",
                    status="OK",
                    detail={"objects_removed": n, "reason": "scheduled"},
                )

            def mark(state: RingState) -> None:
                for v in due:
                    rec = state.keys.get(v.name)
                    vr = rec.versions.get(v.version) if rec else None
                    if vr is not None and vr.state in (
                        State.DESTRUCTION_SCHEDULED.value,
                        State.DESTROYED.value,
                    ):
                        vr.state = State.DESTROYED.value

            self.update(mark)

    def _current(self) -> Mapping[str, Key]:
        if self._siblings is not None and self._siblings.read() != self._seen_change:
            # A sibling process changed the ring: requests wait for the re-read, so that no
            # call made after the change's response uses the old state.
            self.refresh(only_if_siblings_changed=True)
        snap = self._snapshot
        max_age = self._config.keyring.refresh_seconds
        if self._thread is not None:
            # The background thread keeps the snapshot fresh; a request re-reads the token
            # itself (several ms on its latency) only if that thread has fallen behind.
            max_age *= 3
        if time.monotonic() - snap.loaded_at > max_age:
            due: list[KeyVersion] = []
            if self._lock.acquire(blocking=False):
                try:
                    due = self._reload()
                finally:
                    self._lock.release()
            if due:
                self._destroy_due(due)
        return self._snapshot.keys

    def list_keys(self) -> list[Key]:
        return sorted(self._current().values(), key=lambda k: k.name)

    def get(self, name: str) -> Key:
        key = self._current().get(name)
        if key is None:
            self.refresh()
            key = self._snapshot.keys.get(name)
        if key is None:
            raise KeyNotFound(f"no key named {name!r} in token {self._token.label!r}")
        return key

    def find(self, ref: KeyReference) -> KeyVersion:
        """The version a reference names, whatever its state. Raises KeyNotFound."""
        version = self._find(ref)
        if version is None:
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
                f"{version.describe()} is {_article(version.purpose.value)} key; this call "
                f"needs {_article(purpose.value)} key"
            )
        if version.state is not State.ENABLED:
            raise FailedPrecondition(f"{version.describe()} is {version.state.value}")
        if version.refused:
            raise FailedPrecondition(version.refused)
        return version

    def _find(self, ref: KeyReference) -> KeyVersion | None:
        keys = self._current()
        if ref.name is not None:
            key = keys.get(ref.name)
            if key is None:
                return None
            if ref.version == 0:
                if key.primary is None:
                    raise FailedPrecondition(
                        f"key {ref.name!r} has no enabled primary version; name a version"
                    )
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

    # -- writing --------------------------------------------------------------------------

    def update(self, mutate: Callable[[RingState], T]) -> T:
        """Applies ``mutate`` to the current state and writes the next generation.

        ``mutate`` must only change the state it is given (it may run more than once when
        another process writes at the same moment) and may raise a ServerError to refuse.
        Compare-and-swap in the token: write generation N+1, re-read; if another writer also
        wrote N+1, withdraw ours and retry from what is there now. Raises TokenUnavailable
        when the writes keep colliding.
        """
        with self._write_lock:
            for attempt in range(_WRITE_ATTEMPTS):
                with self.objects_exclusive(), self._token.session("updating the key ring") as s:
                    current = _best(_read_states(s))
                    objects = s.find_key_objects(LABEL_PREFIX)
                    new = copy.deepcopy(current)
                    adopt(new, objects)
                    result = mutate(new)
                    new.generation = current.generation + 1
                    new.writer = os.urandom(8).hex()
                    s.create_data_object(STATE_APPLICATION, STATE_LABEL, new.to_bytes())
                    states = _read_states(s)
                    mine = [o for o, st in states if st.writer == new.writer]
                    rivals = [
                        st
                        for _o, st in states
                        if st.generation == new.generation and st.writer != new.writer
                    ]
                    if rivals:
                        # Someone else wrote the same generation: withdraw ours, retry.
                        for obj in mine:
                            with contextlib.suppress(Exception):
                                s.destroy_object(obj)
                        log.info("key-ring write collided with another writer; retrying")
                    else:
                        for obj, st in states:
                            if st.generation < new.generation:
                                with contextlib.suppress(Exception):
                                    s.destroy_object(obj)
                if not rivals:
                    break
                time.sleep(random.uniform(0.02, 0.2) * (attempt + 1))  # noqa: S311 (jitter)
            else:
                raise FailedPrecondition(
                    "the key-ring state kept changing under concurrent writers; retry"
                )
        # Bump before re-reading: a sibling's change that bumped earlier is in the token
        # already, so this re-read includes it.
        change = self._siblings.bump() if self._siblings is not None else None
        with self._lock:
            if change is not None:
                self._seen_change = change
            self._reload()
        return result

    # -- daemon life ----------------------------------------------------------------------

    def check_config(self) -> list[str]:
        """Checks [keys.NAME] tables against the ring. Raises StartupError for a table that
        names no key; returns warnings (extractable keys) to log at start-up."""
        keys = self._snapshot.keys
        unknown = sorted(set(self._config.keys) - set(keys))
        if unknown:
            raise StartupError(
                f"{self._config.path}: [keys.{unknown[0]}] names a key that is not in token "
                f"{self._token.label!r} (keys: {', '.join(sorted(keys)) or 'none'})"
            )
        warnings = []
        for key in keys.values():
            for v in key.versions:
                if v.state is State.DESTROYED or not v.info.extractable:
                    continue
                if v.refused:
                    warnings.append(v.refused)
                else:
                    warnings.append(
                        f"key {v.name!r} version {v.version}: the token reports its private key "
                        f"as extractable; used only because [keys.{v.name}] allow_extractable "
                        "= true"
                    )
        return warnings

    def start_background_refresh(self) -> None:
        """Re-reads the ring every refresh_seconds in a daemon thread, so that scheduled
        destructions happen on time even when no request arrives."""
        if self._thread is not None:
            return

        def loop() -> None:
            interval = max(self._config.keyring.refresh_seconds, 0.2)
            while not self._stop.wait(interval):
                try:
                    self._check()
                except ServerError as e:
                    log.warning("key-ring refresh failed: %s", e)
                except Exception:
                    log.exception("key-ring refresh failed")

        self._thread = threading.Thread(target=loop, name="keyring-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the background refresh and waits for a refresh in flight to finish, so that
        the token is not closed under it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
