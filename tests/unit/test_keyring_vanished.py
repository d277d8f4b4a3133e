"""The rule that tells a token fault from a real change (``server.keyring.vanished``),
table-driven: which versions a new read lost."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from server.keyring.join import adopt, build_keys
from server.keyring.model import State, version_label
from server.keyring.state import RingState
from server.keyring.vanished import lost_versions
from server.pkcs11.objects import KeyObjectInfo

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@functools.cache
def _public(n: int) -> rsa.RSAPublicKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()


def obj(name: str, version: int) -> KeyObjectInfo:
    nums = _public(version).public_numbers()
    return KeyObjectInfo(
        cka_id=bytes([version]) * 16,
        label=version_label(name, version),
        modulus=nums.n,
        public_exponent=nums.e,
        can_sign=True,
        can_decrypt=False,
        can_unwrap=False,
        local=True,
        never_extractable=True,
        always_sensitive=True,
        extractable=False,
        sensitive=True,
    )


def _state(objects: list[KeyObjectInfo]) -> RingState:
    state = RingState(generation=1)
    adopt(state, objects, NOW)
    return state


def _mark(state: RingState, version: int, value: str, destroy_at: datetime | None = None) -> None:
    vr = state.keys["k"].versions[version]
    vr.state, vr.destroy_at = value, destroy_at


BEFORE = [obj("k", 1), obj("k", 2)]


@pytest.mark.parametrize(
    ("after", "mark", "lost"),
    [
        # nothing changed
        (BEFORE, None, []),
        # the token read as empty, the state unchanged: a fault until shown otherwise
        ([], None, ["k v1", "k v2"]),
        # one version's objects gone with nothing recorded
        ([obj("k", 1)], None, ["k v2"]),
        # destroyed, and the state says so
        ([obj("k", 1)], (2, State.DESTROYED.value, None), []),
        # scheduled, and its time has come: an admin daemon carried it out
        ([obj("k", 1)], (2, State.DESTRUCTION_SCHEDULED.value, NOW - timedelta(seconds=1)), []),
        # scheduled for later: gone too early
        (
            [obj("k", 1)],
            (2, State.DESTRUCTION_SCHEDULED.value, NOW + timedelta(days=1)),
            ["k v2"],
        ),
        # disabled is not destroyed
        ([obj("k", 1)], (2, State.DISABLED.value, None), ["k v2"]),
        # a new version appearing loses nothing
        ([*BEFORE, obj("k", 3)], None, []),
    ],
)
def test_lost_versions(
    after: list[KeyObjectInfo], mark: tuple[int, str, datetime | None] | None, lost: list[str]
) -> None:
    before_state = _state(BEFORE)
    before = build_keys(BEFORE, before_state)
    after_state = _state(BEFORE)
    if mark is not None:
        _mark(after_state, *mark)
    assert lost_versions(before, build_keys(after, after_state), after_state, NOW) == lost


def test_a_ring_whose_state_went_missing_too_lost_everything() -> None:
    before = build_keys(BEFORE, _state(BEFORE))
    assert lost_versions(before, {}, RingState(), NOW) == ["k v1", "k v2"]


def test_a_first_read_loses_nothing() -> None:
    assert lost_versions({}, {}, RingState(), NOW) == []
