"""Reading and writing the key-ring state document safely against other processes
(docs/adr/0007-keyring-state-concurrency.md): the generation floor a process has seen, the
patient read that never takes a missed document for generation 0, and the check after a
write that withdraws it when it collided. ``server.keyring.ring.KeyRing.update`` runs the
compare-and-swap loop with these.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from server.errors import TokenUnavailable
from server.keyring import state as state_doc
from server.keyring.join import adopt
from server.keyring.model import LABEL_PREFIX
from server.keyring.state import STATE_APPLICATION, STATE_LABEL, RingState, read_states
from server.pkcs11.session import Session

T = TypeVar("T")

log = logging.getLogger("server.keyring.ring")

#: How long scans of the state document are repeated when a scan finds less than this process
#: saw before (it raced another process's write: docs/design-facts.md fact 12; measured on
#: SoftHSM2, such a miss lasts milliseconds, sometimes over a second), or, for a writer, while
#: several documents share the highest generation (writers colliding).
READ_PATIENCE_SECONDS = 3.0


class StateInDoubt(TokenUnavailable):
    """Scans keep finding no state document, or an older one, than this process read before:
    a scan raced a write for longer than READ_PATIENCE_SECONDS, or the token fails or was
    replaced. The ring re-initialises the token and, with the floor forgotten, reads again
    before it believes such a read."""


class StateStore:
    """The state document as one process reads and writes it; thread-safe enough for the
    ring's own locks (the floor only ever rises, except when reset after a recovery)."""

    def __init__(self, pause: Callable[[float], None] = time.sleep) -> None:
        """``pause``: how a patient read waits between scans (the ring lets other processes
        take their turn on the token meanwhile)."""
        #: The highest generation this process has read or written.
        self._floor = 0
        self._pause = pause

    def read(self, s: Session, settled: bool = False) -> RingState:
        """The current state document (highest generation; docs/adr/0007).

        A scan that finds no document, or an older one, than this process read before raced
        another process's write (docs/design-facts.md fact 12) and is repeated; a token with
        hsmsign keys but no document is scanned again too before it counts as new. With
        ``settled`` (writers), scans are repeated while several documents share the highest
        generation, so that no write is built on a document about to be withdrawn. Raises
        StateInDoubt when the state keeps reading as older than seen."""
        deadline = time.monotonic() + READ_PATIENCE_SECONDS
        pause = 0.005
        for scan in itertools.count():
            states = read_states(s)
            problem = state_doc.doubt(states, self._floor)
            last = time.monotonic() > deadline
            unsure = (not states and scan < 2) or (settled and len(state_doc.top(states)) > 1)
            if problem is None and (last or not unsure):
                current = state_doc.current(states)
                self.saw(current.generation)
                return current
            if problem is not None and last:
                raise StateInDoubt(f"{problem} (a scan raced a write, or the token fails)")
            self._pause(pause)
            pause = min(pause * 2, 0.2)
        raise AssertionError("unreachable")

    def write_next(
        self, s: Session, mutate: Callable[[RingState], T], attempts: dict[str, T]
    ) -> str | None:
        """One compare-and-swap attempt: ``mutate`` the settled current state into the next
        generation, write it, and ``settle`` it. ``attempts`` maps each earlier attempt's
        write id to what ``mutate`` returned for it; this one is added. Returns the write id
        that took effect (this attempt's, or an earlier one that a later write was built on,
        or that landed although the token's answer to it was lost), or None when it collided.
        Raises StateInDoubt or the token's error."""
        current = self.read(s, settled=True)
        done = next((w for w in current.applied if w in attempts), None)
        if done is None and current.writer in attempts and self.settle(s, current):
            done = current.writer  # the token failed after storing it: it is there
        if done is not None:
            return done
        new = current.successor(os.urandom(8).hex())
        adopt(new, s.find_key_objects(LABEL_PREFIX))
        attempts[new.writer] = mutate(new)
        s.create_data_object(STATE_APPLICATION, STATE_LABEL, new.to_bytes())
        if not self.settle(s, new):
            return None
        self.saw(new.generation)
        return new.writer

    def saw(self, generation: int) -> None:
        """Raises the floor to a generation this process wrote or read."""
        self._floor = max(self._floor, generation)

    def reset_floor(self) -> None:
        """Forgets the highest generation seen (an int store: safe from any thread)."""
        self._floor = 0

    def settle(self, s: Session, new: RingState) -> bool:
        """After creating ``new``: whether it is accepted. Two scans, a moment apart, so a
        rival that one misses the other sees. A rival of the same generation makes this
        writer withdraw its document (both may; both then retry); a higher generation
        accepts it only if that document was built on it (its ``applied`` names ``new``).
        The accepted writer destroys the older documents."""
        mine: list[Any] = []
        for check in range(2):
            if check:
                time.sleep(random.uniform(0.005, 0.02))  # noqa: S311 (jitter)
            states = read_states(s)
            mine = [o for o, st in states if st.writer == new.writer]
            higher = [st for _o, st in states if st.generation > new.generation]
            rivals = [
                st
                for _o, st in states
                if st.generation == new.generation and st.writer != new.writer
            ]
            if higher and any(new.writer in st.applied for st in higher):
                return True  # built on: the later writer removes this document
            if higher or rivals or not mine:
                for obj in mine:
                    s.destroy_object(obj)
                log.info("key-ring write collided with another writer; retrying")
                return False
        for obj, st in read_states(s):
            if st.generation < new.generation:
                s.destroy_object(obj)
        return True
