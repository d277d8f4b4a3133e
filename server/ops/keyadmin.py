"""Key administration on the token: used by the KeyAdmin service and by `hsmsignd keys`.

Every change goes through ``KeyRing.update`` (the ring state in the token, compare-and-swap),
so a running daemon and an offline ceremony see the same ring. A new version is made in three
steps: its number is reserved in the state (so two processes rotating at once cannot both make
"v3"), the key pair is generated (or imported) in the token, then the version is recorded as
enabled. Each function raises KeyNotFound, InvalidArgument or FailedPrecondition with a
one-line message, and token errors as classified by ``server.pkcs11.errors``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from datetime import timedelta

from hsmsign import key_wrap, keyformats
from server.errors import FailedPrecondition, InvalidArgument, KeyNotFound, ServerError
from server.keyring.model import (
    ALLOWED_BITS,
    PENDING,
    Key,
    KeyVersion,
    Purpose,
    State,
    check_name,
    now_utc,
    spki_b64,
    version_label,
)
from server.keyring.ring import KeyRing
from server.keyring.state import KeyRecord, RingState, VersionRecord
from server.pkcs11.objects import KeyObjectInfo
from server.pkcs11.session import Session
from server.pkcs11.token import Token

log = logging.getLogger(__name__)

#: Default delay before a scheduled destruction when the caller names none.
DEFAULT_DESTRUCTION_DELAY = timedelta(hours=24)
#: Longest delay accepted: beyond any retention period, and far inside what a timestamp holds
#: (a larger one overflowed into INTERNAL).
MAX_DESTRUCTION_DELAY = timedelta(days=3650)

MakeObjects = Callable[[Session, str, bytes], KeyObjectInfo]


def _check_bits(bits: int) -> None:
    if bits not in ALLOWED_BITS:
        *others, last = ALLOWED_BITS
        choices = f"{', '.join(str(b) for b in others)} or {last}"
        raise InvalidArgument(f"RSA-{bits} is not offered; choose {choices}")


def _record(state: RingState, name: str) -> KeyRecord:
    rec = state.keys.get(name)
    if rec is None or not any(v.state != PENDING for v in rec.versions.values()):
        raise KeyNotFound(f"no key named {name!r}")
    return rec


def _version_record(state: RingState, name: str, version: int) -> tuple[KeyRecord, VersionRecord]:
    rec = _record(state, name)
    vr = rec.versions.get(version)
    if vr is None or vr.state == PENDING:
        raise KeyNotFound(f"key {name!r} has no version {version}")
    return rec, vr


def _new_version(
    ring: KeyRing,
    name: str,
    purpose: Purpose,
    bits: int,
    *,
    new_key: bool,
    make_primary: bool,
    imported: bool,
    make_objects: MakeObjects,
    spki: str | None = None,
) -> KeyVersion:
    check_name(name)
    cka_id = os.urandom(16)

    def reserve(state: RingState) -> int:
        if spki is not None:
            for other_name, other in state.keys.items():
                for n, v in other.versions.items():
                    if v.spki == spki:
                        raise FailedPrecondition(
                            f"this key is already in the ring as key {other_name!r} version {n}"
                        )
        rec = state.keys.get(name)
        exists = rec is not None and any(v.state != PENDING for v in rec.versions.values())
        if new_key and exists:
            raise FailedPrecondition(f"a key named {name!r} already exists; rotate it instead")
        if rec is None or not exists:
            if not new_key and not imported:
                raise KeyNotFound(f"no key named {name!r}")
            rec = state.keys[name] = KeyRecord(purpose=purpose.value, bits=bits)
        elif rec.purpose != purpose.value:
            raise FailedPrecondition(
                f"key {name!r} is a {rec.purpose} key; a {purpose.value} version cannot join it"
            )
        elif rec.bits != bits:
            raise FailedPrecondition(
                f"key {name!r} is RSA-{rec.bits}; an RSA-{bits} version cannot join it"
            )
        n = max(rec.versions, default=0) + 1
        rec.versions[n] = VersionRecord(
            state=PENDING, cka_id=cka_id.hex(), created_at=now_utc(), imported=imported
        )
        return n

    version = ring.update(reserve)
    label = version_label(name, version)
    try:
        with ring.objects_exclusive(), ring.token.session(f"making key pair {label}") as s:
            info = make_objects(s, label, cka_id)
    except BaseException:

        def release(state: RingState) -> None:
            rec = state.keys.get(name)
            if rec is not None:
                rec.versions.pop(version, None)
                if not rec.versions:
                    del state.keys[name]

        ring.update(release)
        raise

    pub = keyformats.public_key_from_numbers(info.modulus, info.public_exponent)

    def finish(state: RingState) -> None:
        rec = state.keys[name]
        vr = rec.versions[version]
        vr.state = State.ENABLED.value
        vr.cka_id = cka_id.hex()
        vr.spki = spki_b64(pub)
        current = rec.versions.get(rec.primary)
        if make_primary or current is None or current.state != State.ENABLED.value:
            rec.primary = version

    ring.update(finish)
    log.info(
        "%s %s (RSA-%d %s) sha256:%s",
        "imported" if imported else "generated",
        label,
        bits,
        purpose.value,
        keyformats.fingerprint(pub),
    )
    return ring.get(name).version(version)


def _generate(purpose: Purpose, bits: int) -> MakeObjects:
    def make(s: Session, label: str, cka_id: bytes) -> KeyObjectInfo:
        return s.generate_rsa_keypair(
            bits,
            label,
            cka_id,
            sign=purpose is Purpose.SIGN,
            decrypt=purpose is Purpose.UNWRAP,
        )

    return make


def create_key(token: Token, ring: KeyRing, name: str, purpose: Purpose, bits: int) -> KeyVersion:
    """Generates version 1 of a new key inside the token. Raises if the name is taken."""
    check_name(name)
    _check_bits(bits)
    return _new_version(
        ring,
        name,
        purpose,
        bits,
        new_key=True,
        make_primary=True,
        imported=False,
        make_objects=_generate(purpose, bits),
    )


def rotate_key(ring: KeyRing, name: str, make_primary: bool) -> KeyVersion:
    """Generates the next version of a key, with the key's purpose and size."""
    key = ring.get(check_name(name))
    return _new_version(
        ring,
        name,
        key.purpose,
        key.bits,
        new_key=False,
        make_primary=make_primary,
        imported=False,
        make_objects=_generate(key.purpose, key.bits),
    )


def import_key(
    ring: KeyRing, name: str, purpose: Purpose, private_key_der: bytes, make_primary: bool
) -> KeyVersion:
    """Writes an existing RSA private key (unencrypted DER PKCS#8) into the token as a new
    version of ``name`` (a new key when the name is free). Never logs key material."""
    check_name(name)
    try:
        key = key_wrap.check_importable(private_key_der)  # rsaEncryption, e = 65537, >= 2048
    except key_wrap.UnsuitableKey as e:
        raise InvalidArgument(f"private_key_der: {e}") from None
    bits = key.key_size
    _check_bits(bits)
    priv = key.private_numbers()
    numbers = {
        "n": priv.public_numbers.n,
        "e": priv.public_numbers.e,
        "d": priv.d,
        "p": priv.p,
        "q": priv.q,
        "dmp1": priv.dmp1,
        "dmq1": priv.dmq1,
        "iqmp": priv.iqmp,
    }
    del key, priv

    def make(s: Session, label: str, cka_id: bytes) -> KeyObjectInfo:
        return s.import_rsa_private_key(
            label,
            cka_id,
            numbers,
            sign=purpose is Purpose.SIGN,
            decrypt=purpose is Purpose.UNWRAP,
        )

    pub = keyformats.public_key_from_numbers(numbers["n"], numbers["e"])
    try:
        return _new_version(
            ring,
            name,
            purpose,
            bits,
            new_key=False,
            make_primary=make_primary,
            imported=True,
            make_objects=make,
            spki=spki_b64(pub),
        )
    finally:
        numbers.clear()


def new_imported_version(
    ring: KeyRing,
    name: str,
    purpose: Purpose,
    bits: int,
    make_primary: bool,
    make_objects: MakeObjects,
    spki: str,
) -> KeyVersion:
    """An imported version whose objects ``make_objects`` writes (server.ops.key_import unwraps
    them inside the token); the ring steps are those of ``import_key``."""
    check_name(name)
    _check_bits(bits)
    return _new_version(
        ring,
        name,
        purpose,
        bits,
        new_key=False,
        make_primary=make_primary,
        imported=True,
        make_objects=make_objects,
        spki=spki,
    )


def _live_version(ring: KeyRing, name: str, version: int) -> KeyVersion:
    """The version as the ring sees it (objects included); refuses destroyed versions."""
    ring.refresh()
    v = ring.get(check_name(name)).version(version)
    return v


def set_primary(ring: KeyRing, name: str, version: int) -> Key:
    v = _live_version(ring, name, version)
    if v.state is not State.ENABLED:
        raise FailedPrecondition(
            f"{v.describe()} is {v.state.value}; only an enabled version can be primary"
        )
    if v.refused:
        raise FailedPrecondition(v.refused)

    def mutate(state: RingState) -> None:
        rec, vr = _version_record(state, name, version)
        if vr.state != State.ENABLED.value:
            raise FailedPrecondition(f"{v.describe()} is {vr.state}")
        rec.primary = version

    ring.update(mutate)
    return ring.get(name)


def _refuse_then_update(ring: KeyRing, v: KeyVersion, mutate: Callable[[RingState], None]) -> None:
    """Refuses the version in the token first (every process, at once: docs/adr/0007), then
    writes the state; if the write refuses or fails, the token's refusal is undone unless the
    state (re-read) says the version is not enabled after all."""
    ring.set_token_usage(v, usable=False)
    try:
        ring.update(mutate)
    except BaseException:
        # Left refused if this fails too: listed as disabled, which is what it then is.
        with contextlib.suppress(ServerError):
            ring.refresh()
            if ring.recorded_state(v.name, v.version) == State.ENABLED.value:
                ring.set_token_usage(v, usable=True)
        raise


def _refuse_primary(v: KeyVersion) -> None:
    if v.primary:
        raise FailedPrecondition(
            f"{v.describe()} is the primary version; set another primary first"
        )


def disable_version(ring: KeyRing, name: str, version: int) -> Key:
    """Disables a version: the token refuses it at once, then the state records it."""
    v = _live_version(ring, name, version)
    if v.state is State.DESTROYED:
        raise FailedPrecondition(f"{v.describe()} is destroyed")
    _refuse_primary(v)

    def mutate(state: RingState) -> None:
        rec, vr = _version_record(state, name, version)
        if rec.primary == version:
            raise FailedPrecondition(
                f"{v.describe()} is the primary version; set another primary first"
            )
        if vr.state == State.DESTRUCTION_SCHEDULED.value:
            raise FailedPrecondition(
                f"{v.describe()} is scheduled for destruction (and so unusable); cancel the "
                "destruction to make it disabled"
            )
        if vr.state != State.DESTROYED.value:
            vr.state = State.DISABLED.value

    if v.state is State.DESTRUCTION_SCHEDULED:
        ring.update(mutate)  # refuses, with the message
    _refuse_then_update(ring, v, mutate)
    return ring.get(name)


def enable_version(ring: KeyRing, name: str, version: int) -> Key:
    """Enables a version: the state records it, then the token allows it again.

    In this order because every state write refuses, in the token, each version its state
    does not enable (``KeyRing.update``): with the token allowed first, another writer's
    write landing between the two steps refused the version again, and the enable that
    returned OK was lost (seen in tests/integration/test_keyring_concurrency.py). A disable
    that writes after this enable has the last word: the state is read again after the token
    step and the version refused again if it is no longer enabled. Raises FailedPrecondition
    when the token does not let it be allowed again (then listed as disabled)."""
    v = _live_version(ring, name, version)
    if v.state is State.DESTROYED:
        raise FailedPrecondition(f"{v.describe()} is destroyed and cannot be enabled")
    if v.state is State.DESTRUCTION_SCHEDULED:
        raise FailedPrecondition(
            f"{v.describe()} is scheduled for destruction; cancel the destruction first"
        )

    def mutate(state: RingState) -> None:
        _rec, vr = _version_record(state, name, version)
        if vr.state == State.DESTROYED.value:
            raise FailedPrecondition(f"{v.describe()} is destroyed and cannot be enabled")
        if vr.state == State.DESTRUCTION_SCHEDULED.value:
            raise FailedPrecondition(
                f"{v.describe()} is scheduled for destruction; cancel the destruction first"
            )
        vr.state = State.ENABLED.value

    ring.update(mutate)
    ring.set_token_usage(v, usable=True)
    ring.refresh()
    if ring.recorded_state(name, version) != State.ENABLED.value:
        ring.set_token_usage(v, usable=False)
    return ring.get(name)


def _hours(d: timedelta) -> str:
    hours = d.total_seconds() / 3600
    return f"{hours:g} hour" + ("" if hours == 1 else "s")


def destruction_delay(seconds: float) -> timedelta:
    """The delay of ``seconds``. Raises InvalidArgument when negative or above
    MAX_DESTRUCTION_DELAY (before anything could overflow)."""
    if not seconds >= 0:  # also NaN
        raise InvalidArgument("delay must not be negative")
    if seconds > MAX_DESTRUCTION_DELAY.total_seconds():
        raise InvalidArgument(f"delay must be at most {MAX_DESTRUCTION_DELAY.days} days (10 years)")
    return timedelta(seconds=seconds)


def schedule_destruction(ring: KeyRing, name: str, version: int, delay: timedelta | None) -> Key:
    """Schedules the version's objects for destruction after ``delay`` (default 24 h, never
    less than the configured minimum). Whoever refreshes the ring after that time destroys
    them."""
    minimum = timedelta(seconds=ring.config.keyring.min_destruction_delay_seconds)
    if delay is None:
        delay = max(DEFAULT_DESTRUCTION_DELAY, minimum)
    destruction_delay(delay.total_seconds())  # the bounds
    if delay < minimum:
        raise InvalidArgument(
            f"delay {_hours(delay)} is below this daemon's minimum of {_hours(minimum)} "
            "(keyring.min_destruction_delay_hours)"
        )
    v = _live_version(ring, name, version)
    if v.state is State.DESTROYED:
        raise FailedPrecondition(f"{v.describe()} is already destroyed")
    destroy_at = now_utc() + delay

    def mutate(state: RingState) -> None:
        rec, vr = _version_record(state, name, version)
        if rec.primary == version:
            raise FailedPrecondition(
                f"{v.describe()} is the primary version; set another primary first"
            )
        if vr.state == State.DESTRUCTION_SCHEDULED.value:
            raise FailedPrecondition(
                f"{v.describe()} is already scheduled for destruction at {vr.destroy_at}; "
                "cancel it first to change the time"
            )
        if vr.state == State.DESTROYED.value:
            raise FailedPrecondition(f"{v.describe()} is already destroyed")
        vr.state = State.DESTRUCTION_SCHEDULED.value
        vr.destroy_at = destroy_at

    if v.state is State.DESTRUCTION_SCHEDULED:
        ring.update(mutate)  # refuses, with the message
    _refuse_primary(v)
    _refuse_then_update(ring, v, mutate)
    log.warning("%s scheduled for destruction at %s", v.describe(), destroy_at.isoformat())
    # A zero delay destroys at once (the refresh that follows finds it due).
    ring.refresh()
    return ring.get(name)


def cancel_destruction(ring: KeyRing, name: str, version: int) -> Key:
    """Cancels a scheduled destruction; the version becomes disabled (enable it to use it)."""
    v = _live_version(ring, name, version)

    def mutate(state: RingState) -> None:
        _rec, vr = _version_record(state, name, version)
        if vr.state != State.DESTRUCTION_SCHEDULED.value or v.state is State.DESTROYED:
            raise FailedPrecondition(
                f"{v.describe()} is {v.state.value}, not scheduled for destruction"
            )
        vr.state = State.DISABLED.value
        vr.destroy_at = None

    ring.update(mutate)
    return ring.get(name)
