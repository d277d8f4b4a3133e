"""The key ring as requests see it: a cached join of the token's key objects and the state
document, refreshed from the token, and the one way to change the state (``KeyRing.update``).

Every ``keyring.refresh_seconds`` a daemon reads the state document, and reads the key objects
again when the state changed, when a destruction falls due, and at least every
``FULL_SCAN_SECONDS``; when a request names something unknown, at most once per
``refresh_seconds``. A read that failed is never installed, and a read that lost keys is
believed only after the module was re-initialised (``server.keyring.vanished``). The choice
and its residual race are written down in docs/adr/0002-key-ring-state.md.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from server.audit import trail as audit
from server.config import Config
from server.errors import (
    FailedPrecondition,
    KeyNotFound,
    ServerError,
    StartupError,
    TokenUnavailable,
)
from server.keyring.hostlock import HostLock, ObjectsLock, SiblingsLock, default_lock_file
from server.keyring.join import build_keys, due_for_destruction, usable_against_state
from server.keyring.model import LABEL_PREFIX, Key, KeyReference, KeyVersion, Purpose, State
from server.keyring.state import RingState
from server.keyring.store import StateInDoubt, StateStore
from server.keyring.vanished import lost_versions
from server.pkcs11.errors import TokenFault
from server.pkcs11.objects import KeyObjectInfo
from server.pkcs11.session import Session
from server.pkcs11.token import Token, TokenState

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts at a state write that keeps colliding with another process's write.
_WRITE_ATTEMPTS = 8

#: The background check reads the key objects again at least this often even when the state
#: document did not change: objects created or destroyed by other tools than hsmsign show up
#: within this time (a request naming an unknown key re-reads at once anyway).
FULL_SCAN_SECONDS = 60.0

#: Seconds a read that lost versions waits for the token's re-initialisation before the
#: call that made it gets UNAVAILABLE (the recovery goes on in the background).
REREAD_WAIT = 1.0
WRITING = "updating the key ring"


@dataclass
class _Snapshot:
    keys: dict[str, Key] = field(default_factory=dict)
    #: When the ring was last known to be current (monotonic).
    loaded_at: float = 0.0
    #: The state document the keys were built from, and when the key objects were read.
    state: RingState | None = None
    scanned_at: float = 0.0


class ChangeCounter(SiblingsLock, Protocol):
    """A counter shared by a daemon's serving processes (``server.supervisor.SharedCounter``),
    with their lock over the token's objects."""

    def read(self) -> int: ...

    def bump(self) -> int:
        """Adds one; returns the new value."""
        ...


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


class KeyRing:
    """Resolves key references to versions; thread-safe; refreshes from the token.

    ``update`` is the one way to change the ring state (admin calls and scheduled
    destruction go through it).
    """

    def __init__(
        self,
        token: Token,
        config: Config,
        siblings: ChangeCounter | None = None,
        destroys_due: bool | None = None,
    ) -> None:
        """``destroys_due``: whether this ring carries out destructions whose time has come;
        by default only a daemon allowed to administer keys (``server.key_admin``) does. The
        others leave a due version in the token, unusable (it is not enabled), until an
        admin daemon or ``hsmsignd keys`` destroys it."""
        self._token = token
        self._config = config
        self._destroys_due = config.server.key_admin if destroys_due is None else destroys_due
        # Serving processes of one daemon share a counter that each bumps after changing the
        # ring, so a sibling re-reads before its next request (read-your-writes across them).
        self._siblings = siblings
        self._seen_change = siblings.read() if siblings else 0
        lock_file = config.keyring.lock_file
        host_lock = HostLock(Path(lock_file) if lock_file else default_lock_file(token.label))
        self._objects = ObjectsLock(host_lock, siblings)
        self._snapshot = _Snapshot()
        #: The highest state generation this process has read or written: generations only
        #: grow, so a scan that finds less raced a write or failed (never generation 0).
        self._store = StateStore(pause=self._objects.pause)
        self._lock = threading.RLock()  # guards reading + installing a snapshot
        self._write_lock = threading.RLock()  # one state writer per process
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._readable = True
        self._unreadable_why = ""
        self._listeners: list[Callable[[bool, str], None]] = []
        self.refresh()
        token.add_listener(self._on_token)

    @property
    def token(self) -> Token:
        return self._token

    @property
    def config(self) -> Config:
        return self._config

    def objects_exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold while reading or changing the token's objects: every other hsmsign process on
        this host waits (SoftHSM2 fails or misses reads that race with a creation, rewrite or
        destruction in another process: server.keyring.hostlock)."""
        return self._objects.held()

    # -- reading --------------------------------------------------------------------------

    def _read(
        self, after_reinit: bool = False, doubt: StateInDoubt | None = None
    ) -> tuple[dict[str, Key], RingState]:
        """Reads objects and state (a read only: retried once on a token fault). A state that
        keeps reading as older than seen (``StateInDoubt``) is believed only after the token
        was re-initialised (SoftHSM2 never re-reads a token it once failed to read, design
        fact 9, and a re-initialised token may hold an older generation). Raises
        TokenUnavailable (marking the ring unreadable) when the read fails. ``doubt``: a scan
        just now stayed in doubt for its whole patience (re-initialise without another)."""

        def read(s: Session) -> tuple[list[KeyObjectInfo], RingState]:
            return s.find_key_objects(LABEL_PREFIX), self._store.read(s)

        try:
            if doubt is not None and not after_reinit:
                raise doubt
            with self.objects_exclusive():
                objects, state = self._token.run("reading the key ring", read)
        except StateInDoubt as e:
            if not after_reinit:
                log.warning("key ring: %s; re-initialising the token before believing it", e)
                if self._token.reinitialize(f"the key-ring state is in doubt: {e}", REREAD_WAIT):
                    self._store.reset_floor()
                    return self._read(after_reinit=True)
            self._set_readable(False, str(e))
            raise
        except TokenUnavailable as e:  # not Busy: a full pool is load, not an unreadable ring
            self._set_readable(False, str(e))
            raise
        return build_keys(objects, state, self._config.key_options), state

    def _reload(self, doubt: StateInDoubt | None = None) -> list[KeyVersion]:
        """Re-reads objects and state; installs the snapshot; returns versions now due for
        destruction. Call with ``_lock`` held.

        A read that failed is never installed. A read that lost versions the installed ring
        had (``server.keyring.vanished``) is a token fault until shown otherwise: the module
        is re-initialised and the ring read again, and only what that read says is
        installed. Raises TokenUnavailable while the token cannot be read."""
        keys, state = self._read(doubt=doubt)
        lost = lost_versions(self._snapshot.keys, keys, state)
        if lost:
            shown = ", ".join(lost[:5]) + (f" and {len(lost) - 5} more" if len(lost) > 5 else "")
            log.warning(
                "key-ring read lost %s without a recorded destruction; re-initialising the "
                "token before believing it",
                shown,
            )
            if not self._token.reinitialize(f"the key-ring read lost {shown}", REREAD_WAIT):
                why = "the key ring lost keys and the token is being re-initialised; retry"
                self._set_readable(False, why)
                raise TokenUnavailable(why)
            keys, state = self._read()
            still = lost_versions(self._snapshot.keys, keys, state)
            if still:
                log.warning(
                    "key-ring read after re-initialising the token still lacks %s: accepted "
                    "(their objects were removed outside hsmsign)",
                    ", ".join(still),
                )
        now_mono = time.monotonic()
        self._snapshot = _Snapshot(keys=keys, loaded_at=now_mono, state=state, scanned_at=now_mono)
        self._set_readable(True, "")
        return due_for_destruction(keys, state) if self._destroys_due else []

    # -- whether the ring can be read (health) ------------------------------------------

    @property
    def readable(self) -> bool:
        """Whether the last read of the ring succeeded."""
        return self._readable

    def add_listener(self, listener: Callable[[bool, str], None]) -> None:
        """Calls ``listener(readable, why)`` whenever that changes, and once now."""
        self._listeners.append(listener)
        listener(self._readable, self._unreadable_why)

    def _set_readable(self, ok: bool, why: str) -> None:
        if ok == self._readable:
            return
        self._readable, self._unreadable_why = ok, why
        if ok:
            log.warning("key ring readable again: %d keys", len(self._snapshot.keys))
        else:
            log.warning("key ring cannot be read: %s", why)
        for listener in list(self._listeners):
            listener(ok, why)

    def _on_token(self, state: TokenState, _why: str) -> None:
        if state is TokenState.USABLE:
            # The module was re-initialised, perhaps on a token restored from an older copy:
            # the generation seen before is no floor for it (without the ring's lock, which a
            # read waiting for this recovery may hold).
            self._store.reset_floor()
            self._wake.set()  # read the ring again now, not at the next interval

    def _check(self) -> None:
        """The background refresh. Reading every key object holds a session and the GIL for
        a time that grows with the number of versions, in every serving process every
        refresh_seconds. This reads only the state document (a fraction of that), which every
        change hsmsign makes writes anew, and reads the objects again when it changed, when a
        destruction falls due, or when the last full read is FULL_SCAN_SECONDS old."""
        doubt: StateInDoubt | None = None
        with self._lock:
            snap = self._snapshot
            sibling_change = self._siblings.read() if self._siblings is not None else 0
            if (
                self._readable
                and snap.state is not None
                and sibling_change == self._seen_change
                and time.monotonic() - snap.scanned_at < FULL_SCAN_SECONDS
            ):
                state: RingState | None
                try:
                    with self.objects_exclusive():
                        state = self._token.run("reading the key ring", self._store.read)
                except StateInDoubt as e:
                    state, doubt = None, e  # the full read below re-initialises the token first
                except TokenUnavailable as e:
                    self._set_readable(False, str(e))
                    raise
                same = state is not None and (state.generation, state.writer) == (
                    snap.state.generation,
                    snap.state.writer,
                )
                due = self._destroys_due and due_for_destruction(snap.keys, snap.state)
                if same and not due:
                    self._snapshot = _Snapshot(
                        keys=snap.keys,
                        loaded_at=time.monotonic(),
                        state=snap.state,
                        scanned_at=snap.scanned_at,
                    )
                    return
        self.refresh(doubt=doubt)

    def refresh(
        self, only_if_siblings_changed: bool = False, doubt: StateInDoubt | None = None
    ) -> None:
        """Re-reads the ring from the token, then (on a ring that ``destroys_due``) destroys
        versions whose time has come.

        ``only_if_siblings_changed``: only if another serving process of this daemon changed
        the ring since this process last read it (threads that waited for the lock while one
        of them re-read return at once)."""
        with self._lock:
            if self._siblings is not None:
                change = self._siblings.read()
                if only_if_siblings_changed and change == self._seen_change:
                    return
                self._seen_change = change
            due = self._reload(doubt)
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

    def _missed(self) -> bool:
        """A lookup found nothing in the cached ring: re-reads the token if the last full read
        is older than refresh_seconds (so unknown names cannot make every call read the
        token); whether it did. Raises TokenUnavailable while the ring cannot be read (a miss
        is then no proof that the key is not there)."""
        if not self._readable:
            raise TokenUnavailable(f"the key ring cannot be read now ({self._unreadable_why})")
        if time.monotonic() - self._snapshot.scanned_at < self._config.keyring.refresh_seconds:
            return False
        self.refresh()
        return True

    def get(self, name: str) -> Key:
        """The key named ``name``. Raises KeyNotFound, or TokenUnavailable while the ring
        cannot be read."""
        key = self._current().get(name)
        if key is None and self._missed():
            key = self._snapshot.keys.get(name)
        if key is None:
            raise KeyNotFound(f"no key named {name!r} in token {self._token.label!r}")
        return key

    def find(self, ref: KeyReference) -> KeyVersion:
        """The version a reference names, whatever its state. Raises KeyNotFound, or
        TokenUnavailable while the ring cannot be read."""
        version = self._find(ref)
        if version is None and self._missed():
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
        Compare-and-swap over the token's data objects (docs/adr/0007): write generation N+1
        on a settled generation N, check it (``StateStore.settle``), and retry from what is there
        now unless it was accepted; a withdrawn attempt that a later write was built on counts
        as done (never applied twice). Afterwards the token refuses every version that is not
        enabled. Raises FailedPrecondition when the writes keep colliding, TokenUnavailable
        when the state cannot be read.
        """
        with self._write_lock:
            attempts: dict[str, T] = {}  # write id -> what mutate returned for it
            accepted: str | None = None
            reinitialised = False
            for attempt in range(_WRITE_ATTEMPTS):
                last = attempt == _WRITE_ATTEMPTS - 1
                try:
                    with self.objects_exclusive(), self._token.session(WRITING) as s:
                        accepted = self._store.write_next(s, mutate, attempts)
                except StateInDoubt as e:
                    # The module lost sight of the state (fact 9): re-initialise it, once.
                    if last or reinitialised:
                        raise
                    reinitialised = True
                    log.warning("key-ring write: %s; re-initialising the token first", e)
                    if not self._token.reinitialize(
                        f"the key-ring state is in doubt: {e}", REREAD_WAIT
                    ):
                        raise
                    self._store.reset_floor()
                    continue
                except TokenFault as e:
                    # The next attempt reads whether this one's document landed (its write id).
                    if last or not self._token.wait_usable(REREAD_WAIT):
                        raise
                    log.warning("key-ring write: %s; trying again on the recovered token", e)
                    continue
                if accepted is not None:
                    break
                time.sleep(random.uniform(0.02, 0.2) * (attempt + 1))  # noqa: S311 (jitter)
            if accepted is None:
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
            stale = usable_against_state(self._snapshot.keys)
        for v in stale:
            self.set_token_usage(v, usable=False)
        return attempts[accepted]

    def reset_generation_floor(self) -> None:
        """Forgets the highest generation seen: for the token-recovery path, after the module
        was re-initialised on a token that may have been replaced (a restored copy may hold
        an older generation)."""
        self._store.reset_floor()

    def set_token_usage(self, v: KeyVersion, usable: bool) -> bool:
        """Allows or refuses the version's purpose in the token itself (CKA_SIGN, or
        CKA_DECRYPT and CKA_UNWRAP): a refused version fails in every process at once,
        whatever its ring snapshot says. Returns False, with a warning, when the token does not
        let hsmsign refuse it (the state alone then disables it, within
        keyring.refresh_seconds). Raises FailedPrecondition when the token does not let it be
        allowed again, TokenUnavailable when the token fails."""
        what = f"{'enabling' if usable else 'disabling'} {v.describe()} in the token"
        try:
            with self.objects_exclusive(), self._token.session(what) as s:
                s.set_key_usage(v.cka_id, signs=v.purpose is Purpose.SIGN, usable=usable)
        except FailedPrecondition as e:
            if usable:
                raise
            log.warning(
                "%s: %s; the ring state alone disables it (every daemon within "
                "keyring.refresh_seconds)",
                what,
                e,
            )
            return False
        return True

    def recorded_state(self, name: str, version: int) -> str | None:
        """What the state document, as last read, records for a version (the listed state
        also counts the token's refusal)."""
        state = self._snapshot.state
        rec = state.keys.get(name) if state is not None else None
        vr = rec.versions.get(version) if rec is not None else None
        return vr.state if vr is not None else None

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
            while not self._stop.is_set():
                self._wake.wait(interval)
                self._wake.clear()
                if self._stop.is_set():
                    return
                try:
                    self._check()
                except ServerError:
                    pass  # logged once when the ring became unreadable (_set_readable)
                except Exception:
                    log.exception("key-ring refresh failed")

        self._thread = threading.Thread(target=loop, name="keyring-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the background refresh and waits for a refresh in flight to finish, so that
        the token is not closed under it."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
