"""The join of the token's key objects and the state document into keys: pure functions.

The objects say which key pairs exist (and their public numbers and capabilities); the state
document says the rest (``server.keyring.state``). Neither alone is the ring:

- a version with objects but no record is enabled (a key made by another tool that follows
  the label scheme); ``adopt`` records it so it stays listed once its objects are destroyed;
- a version whose objects are gone is destroyed, whatever its record said, and is listed from
  the public key its record kept;
- a key with no recorded (or no longer usable) primary uses its highest enabled version.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Mapping
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import keyformats
from server.config import KeyOptions
from server.keyring.model import (
    LABEL_RE,
    PENDING,
    Key,
    KeyVersion,
    Purpose,
    State,
    now_utc,
    spki_b64,
    version_label,
)
from server.keyring.state import KeyRecord, RingState, VersionRecord
from server.pkcs11.objects import KeyObjectInfo

log = logging.getLogger(__name__)

#: The options of a key by name (``Config.key_options``).
OptionsOf = Callable[[str], KeyOptions]


def purpose_of(info: KeyObjectInfo) -> Purpose | None:
    """The purpose a key object's capabilities give it; None when it may both sign and
    decrypt (such a key is never used)."""
    if info.can_sign and not (info.can_decrypt or info.can_unwrap):
        return Purpose.SIGN
    if (info.can_decrypt or info.can_unwrap) and not info.can_sign:
        return Purpose.UNWRAP
    return None


def usable_in_token(info: KeyObjectInfo, purpose: Purpose) -> bool:
    """Whether the token lets the key object do its purpose (hsmsign turns CKA_SIGN, or
    CKA_DECRYPT and CKA_UNWRAP, off for a version that is not enabled)."""
    return info.can_sign if purpose is Purpose.SIGN else info.can_decrypt or info.can_unwrap


def _no_capability(info: KeyObjectInfo) -> bool:
    return not (info.can_sign or info.can_decrypt or info.can_unwrap)


def objects_by_version(objects: list[KeyObjectInfo]) -> dict[str, dict[int, KeyObjectInfo]]:
    """Key objects whose label follows the scheme, by key name and version number."""
    out: dict[str, dict[int, KeyObjectInfo]] = {}
    for info in objects:
        m = LABEL_RE.match(info.label)
        if m:
            out.setdefault(m["name"], {})[int(m["version"])] = info
    return out


def _public_key_from_spki(b64: str) -> rsa.RSAPublicKey | None:
    try:
        pk = serialization.load_der_public_key(base64.b64decode(b64))
    except ValueError:
        return None
    return pk if isinstance(pk, rsa.RSAPublicKey) else None


def adopt(state: RingState, objects: list[KeyObjectInfo], now: datetime | None = None) -> None:
    """Records in ``state`` the versions found in the token that it does not know yet
    (keys made outside hsmsign that follow the label scheme, or pending reservations whose
    key pair now exists), so that they stay listed after their objects are destroyed."""
    for name, versions in objects_by_version(objects).items():
        for n, info in versions.items():
            purpose = purpose_of(info)
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
                vr.created_at = now or now_utc()
        rec = state.keys.get(name)
        if rec is not None and rec.primary not in rec.versions:
            live = [n for n, v in rec.versions.items() if v.state == State.ENABLED.value]
            rec.primary = max(live, default=0)


def _destroyed_info(name: str, n: int, vr: VersionRecord, pub: rsa.RSAPublicKey) -> KeyObjectInfo:
    """What a destroyed version still shows: its recorded public key, no capabilities."""
    nums = pub.public_numbers()
    return KeyObjectInfo(
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


def build_keys(
    objects: list[KeyObjectInfo], state: RingState, options: OptionsOf | None = None
) -> dict[str, Key]:
    """Joins the token's key objects with the ring state into keys (the module docstring
    gives the rules). ``options`` says per key whether an extractable key is accepted."""
    found = objects_by_version(objects)
    keys: dict[str, Key] = {}
    for name in sorted(set(found) | set(state.keys)):
        rec = state.keys.get(name)
        objs = found.get(name, {})
        numbers = sorted(set(objs) | set(rec.versions if rec else ()))
        key_purpose = Purpose(rec.purpose) if rec else None
        key_options = options(name) if options else KeyOptions()
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
                info = _destroyed_info(name, n, vr, pub)
                purpose = key_purpose or Purpose.SIGN
                state_ = State.DESTROYED
            else:
                found_purpose = purpose_of(info)
                if found_purpose is None and _no_capability(info) and key_purpose is not None:
                    found_purpose = key_purpose  # disabled in the token itself
                if found_purpose is None:
                    if not _no_capability(info):
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
                if state_ is State.ENABLED and not usable_in_token(info, purpose):
                    # The token refuses it (a disable whose state write has not landed, or
                    # was lost): list it as what it is.
                    state_ = State.DISABLED
            refused = None
            if info.extractable and not key_options.allow_extractable:
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
                    has_objects=n in objs,
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


def due_for_destruction(
    keys: Mapping[str, Key], state: RingState, now: datetime | None = None
) -> list[KeyVersion]:
    """Versions whose destruction is due: scheduled with its time past, or destroyed in the
    state while its objects are still there (a destruction that was cut short)."""
    now = now or now_utc()
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
            unfinished = vr.state == State.DESTROYED.value and v.has_objects
            if scheduled_due or unfinished:
                due.append(v)
    return due


def usable_against_state(keys: Mapping[str, Key]) -> list[KeyVersion]:
    """Versions that are not enabled but whose key objects the token still lets do their
    purpose: a disable from before the token enforced it, or an enable that lost to a
    concurrent disable. Their capabilities are turned off (``KeyRing.update``)."""
    return [
        v
        for key in keys.values()
        for v in key.versions
        if v.has_objects and v.state is not State.ENABLED and usable_in_token(v.info, v.purpose)
    ]
