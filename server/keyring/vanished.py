"""Which key versions a new read of the token lost: the test that tells a token fault from a
real change (pure).

A version whose objects the previous read saw is *lost* when the new read does not see them
and the new state does not account for it: not recorded as destroyed, and not scheduled for a
destruction whose time has come. SoftHSM2 reports an empty token forever after one failed
read (docs/design-facts.md fact 9), and real HSMs return partial results during failover, so
``server.keyring.ring`` re-initialises the module and reads again before it believes a read
that lost versions; if the read after the re-initialisation still agrees, another tool really
removed the objects, and it is accepted (docs/operations.md, "Token faults").
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from server.keyring.model import Key, KeyVersion, State, now_utc
from server.keyring.state import RingState


def has_objects(v: KeyVersion) -> bool:
    """Whether the read found the version's key objects (a destroyed version is listed from
    its recorded public key, without capabilities)."""
    return v.info.can_sign or v.info.can_decrypt or v.info.can_unwrap


def lost_versions(
    before: Mapping[str, Key],
    after: Mapping[str, Key],
    state: RingState,
    now: datetime | None = None,
) -> list[str]:
    """``name vN`` of every version ``before`` had objects for that ``after`` lacks while
    ``state`` does not account for it (see the module docstring)."""
    now = now or now_utc()
    lost = []
    for name, key in before.items():
        new = after.get(name)
        rec = state.keys.get(name)
        for v in key.versions:
            if not has_objects(v):
                continue
            nv = next((x for x in new.versions if x.version == v.version), None) if new else None
            if nv is not None and has_objects(nv):
                continue
            vr = rec.versions.get(v.version) if rec else None
            if vr is not None and (
                vr.state == State.DESTROYED.value
                or (
                    vr.state == State.DESTRUCTION_SCHEDULED.value
                    and vr.destroy_at is not None
                    and vr.destroy_at <= now
                )
            ):
                continue
            lost.append(f"{name} v{v.version}")
    return lost
