"""The host-wide lock on a token's objects: every hsmsign process on this machine (serving
processes of every daemon, and ``hsmsignd keys``) holds it while it reads or changes the key
ring's objects.

SoftHSM2's file store is not safe for a process that reads an object while another process
creates, rewrites or destroys it: the reader may miss the object, for milliseconds or until
the next change (docs/design-facts.md facts 9 and 12; docs/adr/0007). Processes on one host
therefore take turns. This is an accommodation for file tokens, not the concurrency control:
daemons on different hosts share only the token, and the key-ring writes are made safe by
the token itself (compare-and-swap over the state document, usage attributes on the keys).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final, Protocol

log = logging.getLogger(__name__)

#: Where the lock file goes unless keyring.lock_file names one.
DEFAULT_LOCK_DIR: Final = Path("/run/lock")


def default_lock_file(token_label: str) -> Path:
    """The lock file of a token: one per token label on this host."""
    digest = hashlib.sha256(token_label.encode()).hexdigest()[:16]
    return DEFAULT_LOCK_DIR / f"hsmsign-keyring-{digest}.lock"


class HostLock:
    """An exclusive lock over a file (flock), re-entrant within a process. Without a usable
    lock file it warns once and locks this process's threads only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._threads = threading.RLock()
        self._depth = 0
        self._owner = 0
        self._fd: int | None = None
        self._pid = 0
        self._warned = False

    def _file(self) -> int | None:
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        # A forked child opens its own: a flock shared with the parent excludes nothing.
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        except OSError as e:
            if not self._warned:
                log.warning(
                    "cannot open the key-ring lock file %s (%s): hsmsign processes on this "
                    "host will not take turns on the token's objects (keyring.lock_file)",
                    self.path,
                    e.strerror,
                )
                self._warned = True
            self._fd = None
        return self._fd

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._threads:
            fd = self._file() if self._depth == 0 else self._fd
            if self._depth == 0 and fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._depth += 1
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """For the thread that holds the lock, while it waits (a patient read between two
        scans): other processes may take their turn meanwhile; taken again after. This
        process's other threads still wait."""
        mine = self._depth and self._owner == threading.get_ident() and self._pid == os.getpid()
        fd = self._fd if mine else None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        try:
            yield
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)


class SiblingsLock(Protocol):
    """The lock a daemon's serving processes share (``server.supervisor.SharedCounter``)."""

    def objects_exclusive(self) -> contextlib.AbstractContextManager[None]: ...

    def objects_released(self) -> contextlib.AbstractContextManager[None]: ...


class ObjectsLock:
    """One process's turn on the token's objects: this host's lock, then the daemon's
    serving-process lock (always in this order, so no two processes wait for each other)."""

    def __init__(self, host: HostLock, siblings: SiblingsLock | None) -> None:
        self._host = host
        self._siblings = siblings

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._host.held():
            if self._siblings is None:
                yield
            else:
                with self._siblings.objects_exclusive():
                    yield

    def pause(self, seconds: float) -> None:
        """Within ``held``: waits with the other processes let in (a read that waited 3 s for
        a state it lost sight of held up every sibling's own detection of a failed token);
        released in the reverse order, taken again in the order of ``held``."""
        siblings = self._siblings.objects_released() if self._siblings else contextlib.nullcontext()
        with siblings, self._host.released():
            time.sleep(seconds)
