"""The key ring's pure parts, table-driven: the join of state document and token objects
(``server.keyring.join``) and the state document itself (``server.keyring.state``).

Each row is (state, token objects, expected keys: {name: {version: state}}, primary per key).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.config import KeyOptions
from server.keyring import join
from server.keyring import state as state_doc
from server.keyring.model import PENDING, Purpose, State, spki_b64, version_label
from server.keyring.state import KeyRecord, RingState, VersionRecord
from server.pkcs11.objects import KeyObjectInfo

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@functools.cache
def _key(n: int) -> rsa.RSAPublicKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()


def obj(
    name: str,
    version: int,
    *,
    key: int | None = None,
    sign: bool = True,
    decrypt: bool = False,
    extractable: bool = False,
    local: bool = True,
    label: str | None = None,
) -> KeyObjectInfo:
    """A private key object as the token reports it (key: which test key pair)."""
    nums = _key(key if key is not None else version).public_numbers()
    return KeyObjectInfo(
        cka_id=bytes([version]) * 16,
        label=label or version_label(name, version),
        modulus=nums.n,
        public_exponent=nums.e,
        can_sign=sign,
        can_decrypt=decrypt,
        can_unwrap=decrypt,
        local=local,
        never_extractable=not extractable,
        always_sensitive=True,
        extractable=extractable,
        sensitive=True,
    )


def rec(state: str, version: int, **kw: Any) -> VersionRecord:
    return VersionRecord(
        state=state, cka_id=(bytes([version]) * 16).hex(), spki=spki_b64(_key(version)), **kw
    )


def ring(purpose: str = "sign", primary: int = 0, **versions: VersionRecord) -> RingState:
    return RingState(
        generation=1,
        writer="w",
        keys={
            "demo": KeyRecord(
                purpose=purpose,
                bits=2048,
                primary=primary,
                versions={int(k.removeprefix("v")): v for k, v in versions.items()},
            )
        },
    )


E, D, S, X = State.ENABLED, State.DISABLED, State.DESTRUCTION_SCHEDULED, State.DESTROYED


@dataclass
class Row:
    id: str
    state: RingState
    objects: list[KeyObjectInfo]
    #: {name: {version: state}}
    keys: dict[str, dict[int, State]]
    #: {name: primary version or None}
    primary: dict[str, int | None] = field(default_factory=dict)
    options: dict[str, KeyOptions] = field(default_factory=dict)
    #: {(name, version): whether the version is refused}
    refused: dict[tuple[str, int], bool] = field(default_factory=dict)
    #: {(name, version): imported}
    imported: dict[tuple[str, int], bool] = field(default_factory=dict)


ROWS = [
    Row(
        "objects only: enabled, the highest is primary",
        RingState(),
        [obj("demo", 1), obj("demo", 2)],
        {"demo": {1: E, 2: E}},
        {"demo": 2},
    ),
    Row(
        "the recorded primary wins",
        ring(primary=1, v1=rec("enabled", 1), v2=rec("enabled", 2)),
        [obj("demo", 1), obj("demo", 2)],
        {"demo": {1: E, 2: E}},
        {"demo": 1},
    ),
    Row(
        "a primary that is not enabled falls back to the highest enabled",
        ring(primary=2, v1=rec("enabled", 1), v2=rec("disabled", 2)),
        [obj("demo", 1), obj("demo", 2)],
        {"demo": {1: E, 2: D}},
        {"demo": 1},
    ),
    Row(
        "objects gone: destroyed whatever the record says, still listed",
        ring(primary=1, v1=rec("enabled", 1)),
        [],
        {"demo": {1: X}},
        {"demo": None},
    ),
    Row(
        "a pending reservation without objects is not listed",
        ring(primary=1, v1=rec("enabled", 1), v2=rec(PENDING, 2)),
        [obj("demo", 1)],
        {"demo": {1: E}},
        {"demo": 1},
    ),
    Row(
        "a pending reservation whose key pair exists is enabled",
        ring(primary=1, v1=rec("enabled", 1), v2=rec(PENDING, 2)),
        [obj("demo", 1), obj("demo", 2)],
        {"demo": {1: E, 2: E}},
        {"demo": 1},
    ),
    Row(
        "scheduled and disabled states come from the record",
        ring(
            primary=1,
            v1=rec("enabled", 1),
            v2=rec("disabled", 2),
            v3=rec("destruction-scheduled", 3),
        ),
        [obj("demo", 1), obj("demo", 2), obj("demo", 3)],
        {"demo": {1: E, 2: D, 3: S}},
        {"demo": 1},
    ),
    Row(
        "an object that may both sign and decrypt is never used",
        RingState(),
        [obj("both", 1, sign=True, decrypt=True)],
        {},
    ),
    Row(
        "an object of the other purpose does not join the key",
        ring(primary=1, v1=rec("enabled", 1)),
        [obj("demo", 1), obj("demo", 2, sign=False, decrypt=True)],
        {"demo": {1: E}},
        {"demo": 1},
    ),
    Row(
        "an unwrap key from objects only",
        RingState(),
        [obj("legacy", 1, sign=False, decrypt=True)],
        {"legacy": {1: E}},
        {"legacy": 1},
    ),
    Row(
        "labels outside the scheme are not keys",
        RingState(),
        [obj("x", 1, label="hsmsign:demo"), obj("x", 2, label="other:demo:v1")],
        {},
    ),
    Row(
        "an extractable key is refused unless its key allows it",
        RingState(),
        [obj("demo", 1, extractable=True), obj("open", 2, extractable=True)],
        {"demo": {1: E}, "open": {2: E}},
        {"demo": 1, "open": 2},
        options={"open": KeyOptions(allow_extractable=True)},
        refused={("demo", 1): True, ("open", 2): False},
    ),
    Row(
        "provenance: imported from the record, else from CKA_LOCAL",
        ring(primary=1, v1=rec("enabled", 1, imported=True)),
        [obj("demo", 1), obj("other", 2, local=False), obj("third", 3, local=True)],
        {"demo": {1: E}, "other": {2: E}, "third": {3: E}},
        imported={("demo", 1): True, ("other", 2): True, ("third", 3): False},
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_build_keys(row: Row) -> None:
    options = row.options
    keys = join.build_keys(row.objects, row.state, lambda n: options.get(n, KeyOptions()))
    got = {name: {v.version: v.state for v in k.versions} for name, k in keys.items()}
    assert got == row.keys
    for name, primary in row.primary.items():
        p = keys[name].primary
        assert (p.version if p else None) == primary
    for (name, n), refused in row.refused.items():
        assert bool(keys[name].version(n).refused) is refused
    for (name, n), imported in row.imported.items():
        assert keys[name].version(n).imported is imported
    for k in keys.values():  # every version carries its real public key and identifiers
        for v in k.versions:
            assert v.public_key.public_numbers() == _key(v.version).public_numbers()
            assert len(v.fingerprint) == 64


DUE_ROWS = [
    (
        "scheduled, time past",
        ring(v1=rec("destruction-scheduled", 1, destroy_at=NOW - timedelta(seconds=1))),
        [obj("demo", 1)],
        [1],
    ),
    (
        "scheduled, time to come",
        ring(v1=rec("destruction-scheduled", 1, destroy_at=NOW + timedelta(hours=1))),
        [obj("demo", 1)],
        [],
    ),
    (
        "destroyed in the state, objects still there",
        ring(v1=rec("destroyed", 1)),
        [obj("demo", 1)],
        [1],
    ),
    ("destroyed and gone", ring(v1=rec("destroyed", 1)), [], []),
    ("enabled", ring(v1=rec("enabled", 1)), [obj("demo", 1)], []),
]


@pytest.mark.parametrize(
    ("state", "objects", "due"), [r[1:] for r in DUE_ROWS], ids=[r[0] for r in DUE_ROWS]
)
def test_due_for_destruction(
    state: RingState, objects: list[KeyObjectInfo], due: list[int]
) -> None:
    keys = join.build_keys(objects, state)
    assert [v.version for v in join.due_for_destruction(keys, state, NOW)] == due


ADOPT_ROWS = [
    # (id, state before, objects, {version: recorded state}, recorded primary)
    (
        "versions made outside hsmsign are recorded",
        RingState(),
        [obj("demo", 1), obj("demo", 2)],
        {1: "enabled", 2: "enabled"},
        2,
    ),
    (
        "a pending reservation with objects becomes enabled",
        ring(primary=1, v1=rec("enabled", 1), v2=rec(PENDING, 2)),
        [obj("demo", 1), obj("demo", 2)],
        {1: "enabled", 2: "enabled"},
        1,
    ),
    (
        "a recorded state is kept",
        ring(primary=1, v1=rec("enabled", 1), v2=rec("disabled", 2)),
        [obj("demo", 1), obj("demo", 2)],
        {1: "enabled", 2: "disabled"},
        1,
    ),
    (
        "a dual-purpose object is not recorded",
        RingState(),
        [obj("demo", 1, decrypt=True)],
        {},
        None,
    ),
]


@pytest.mark.parametrize(
    ("state", "objects", "versions", "primary"),
    [r[1:] for r in ADOPT_ROWS],
    ids=[r[0] for r in ADOPT_ROWS],
)
def test_adopt(
    state: RingState, objects: list[KeyObjectInfo], versions: dict[int, str], primary: int | None
) -> None:
    join.adopt(state, objects, NOW)
    rec_ = state.keys.get("demo")
    got = {n: v.state for n, v in rec_.versions.items()} if rec_ else {}
    assert got == versions
    if rec_ is not None:
        assert rec_.primary == primary
        for n, v in rec_.versions.items():
            assert v.spki == spki_b64(_key(n)) and v.created_at is not None


def test_the_state_document_round_trips() -> None:
    st = ring(
        primary=1,
        v1=rec("enabled", 1, created_at=NOW, imported=True),
        v2=rec("destruction-scheduled", 2, destroy_at=NOW),
    )
    again = RingState.from_bytes(st.to_bytes())
    assert again == st
    assert again.keys["demo"].purpose == Purpose.SIGN.value


@pytest.mark.parametrize(
    ("generations", "current"),
    [
        ([], (0, "")),
        ([(1, "b"), (2, "a")], (2, "a")),
        ([(3, "b"), (3, "a"), (2, "c")], (3, "a")),  # a tie: every reader picks the same
    ],
)
def test_the_current_state_is_the_highest_generation(
    generations: list[tuple[int, str]], current: tuple[int, str]
) -> None:
    states = [(object(), RingState(generation=g, writer=w)) for g, w in generations]
    best = state_doc.current(states)
    assert (best.generation, best.writer) == current


class _Objects:
    def __init__(self, objects: list[tuple[Any, str, bytes]]) -> None:
        self.objects = objects

    def data_objects(self, application: str) -> list[tuple[Any, str, bytes]]:
        assert application == state_doc.STATE_APPLICATION
        return self.objects


def test_read_states_skips_other_labels_and_unreadable_documents() -> None:
    good = RingState(generation=4, writer="w")
    objects = _Objects(
        [
            ("a", state_doc.STATE_LABEL, good.to_bytes()),
            ("b", state_doc.STATE_LABEL, b"not json"),
            ("c", state_doc.STATE_LABEL, b'{"format": 99, "generation": 1}'),
            ("d", "another-label", good.to_bytes()),
        ]
    )
    assert [(o, s.generation) for o, s in state_doc.read_states(objects)] == [("a", 4)]
