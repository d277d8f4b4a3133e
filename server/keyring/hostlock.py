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
from collections.abc import Iterator
from pathlib import Path
from typing import Final

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
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
