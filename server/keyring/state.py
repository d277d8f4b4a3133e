"""The key-ring state document, kept in the token.

What the key objects cannot say (the primary version, disabled and scheduled states, creation
time, whether a version was imported, the public key of a destroyed version) lives in one
CKO_DATA object (application ``hsmsign``, label ``hsmsign:keyring``) holding JSON with a
generation number, so every daemon on the token agrees without a restart
(docs/adr/0002-key-ring-state.md). A data object's value cannot be changed
(docs/design-facts.md, fact 7), so a write creates the next generation, then destroys the older
ones; readers take the highest generation.

The document types are pure; ``read_states`` is the one reader of the objects.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

from server.keyring.model import Purpose, State

log = logging.getLogger(__name__)

#: Where the ring state lives: a CKO_DATA object with this application and label.
STATE_APPLICATION: Final = "hsmsign"
STATE_LABEL: Final = "hsmsign:keyring"
#: The document's format number; a document of another format is ignored. (Format 1 gained
#: the optional ``applied`` list compatibly: older readers ignore it.)
STATE_FORMAT: Final = 1
#: How many write ids a document carries in ``applied``.
APPLIED_WRITES: Final = 64


def _iso(t: datetime | None) -> str | None:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else None


def _parse_time(s: Any) -> datetime | None:
    if not isinstance(s, str) or not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass
class VersionRecord:
    """What the state document says of one version (the objects say the rest)."""

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
    """What the state document says of one key."""

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
    """The whole ring state: one JSON document in one CKO_DATA object per generation.

    ``writer`` is the id of the write that made this document (random, one per attempt);
    ``applied`` the ids of the last APPLIED_WRITES writes it includes, its own last, so that a
    writer whose document was withdrawn learns whether a later write was built on it."""

    generation: int = 0
    writer: str = ""
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)

    def successor(self, writer: str) -> RingState:
        """A copy to mutate into the next generation, written by ``writer``."""
        new = copy.deepcopy(self)
        new.generation = self.generation + 1
        new.writer = writer
        new.applied = [*self.applied, writer][-APPLIED_WRITES:]
        return new

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": STATE_FORMAT,
                "generation": self.generation,
                "writer": self.writer,
                "keys": {n: k.to_json() for n, k in sorted(self.keys.items())},
                "applied": self.applied,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> RingState:
        """Parses a document; raises ValueError (or KeyError, TypeError) when it is not one."""
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("format") != STATE_FORMAT:
            raise ValueError("unknown key-ring state format")
        return cls(
            generation=int(d["generation"]),
            writer=str(d.get("writer", "")),
            keys={n: KeyRecord.from_json(k) for n, k in d.get("keys", {}).items()},
            applied=[str(w) for w in d.get("applied", [])],
        )


class DataObjects(Protocol):
    """What ``read_states`` needs of a token session (``server.pkcs11.session.Session``)."""

    def data_objects(self, application: str) -> list[tuple[Any, str, bytes]]: ...


def read_states(s: DataObjects) -> list[tuple[Any, RingState]]:
    """Every readable state document in the token, with its object."""
    out = []
    for obj, label, value in s.data_objects(STATE_APPLICATION):
        if label != STATE_LABEL:
            continue
        try:
            out.append((obj, RingState.from_bytes(value)))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable key-ring state object in the token")
    return out


def current(states: list[tuple[Any, RingState]]) -> RingState:
    """The current state: highest generation; on a tie, the smallest writer id (every reader
    picks the same one). No document at all is the empty generation 0."""
    if not states:
        return RingState()
    return min((st for _obj, st in states), key=lambda st: (-st.generation, st.writer))


def top(states: list[tuple[Any, RingState]]) -> list[RingState]:
    """The documents at the highest generation: one when the state is settled, several while
    writers collide (all but one are about to be withdrawn) or after a writer died mid-write."""
    if not states:
        return []
    best = max(st.generation for _obj, st in states)
    return [st for _obj, st in states if st.generation == best]


def doubt(states: list[tuple[Any, RingState]], floor: int) -> str | None:
    """Why a scan that found ``states`` cannot be the token's state, given that generation
    ``floor`` was seen before (generations only grow); None when it can be. A scan that races
    another process's write may miss objects (docs/design-facts.md fact 12): "no document"
    after a document was seen is a collision or a fault, never the empty generation 0."""
    if floor <= 0:
        return None
    if not states:
        return f"no key-ring state document found, though generation {floor} was read before"
    best = max(st.generation for _obj, st in states)
    if best < floor:
        return f"the key-ring state read as generation {best}, though {floor} was read before"
    return None
