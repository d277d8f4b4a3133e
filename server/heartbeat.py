"""Heartbeats: how the supervisor learns that a serving process still works, not only that
it has not exited (issue 16).

The supervisor shares one memfd with its serving processes: one 8-byte slot per process,
holding the CLOCK_MONOTONIC time (nanoseconds, the same clock in every process) of its last
beat. A thread in each serving process writes its slot every ``server.heartbeat_seconds``
while its self-check passes: the thread runs at all (the process is not stopped, and no C
call holds the interpreter), and the token-call watchdog's own thread is running
(``CallWatchdog.alive``: a hung token call is then handled in-process, by
server/pkcs11/watchdog.py), and the gRPC event loop, where every call is received and
answered, ran a callback within half of the timeout (``LoopServer.responsive``). The
supervisor replaces a process whose slot is older than
``server.heartbeat_timeout_seconds`` (SIGKILL, then the usual restart), so a stopped process
costs its callers that long at most: the kill resets its connections and hsmsign's clients
retry the call on another connection.

The self-check does not make a gRPC call: over the shared SO_REUSEPORT port it could not
pick its own process, and with mTLS it would need a client certificate. A process whose gRPC
core stops while its event loop still runs is not detected here (Kubernetes probes the
health service from outside for that).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable

log = logging.getLogger("hsmsignd")

_SLOT = struct.Struct("<Q")


class Heartbeats:
    """One slot per serving process (index 1..count) in shared memory. A slot is written by
    one process only, as one aligned 8-byte store, so no lock is needed."""

    def __init__(self, fd: int, count: int) -> None:
        self.fd, self.count = fd, count
        self._map = mmap.mmap(fd, _SLOT.size * count)

    @classmethod
    def create(cls, count: int) -> Heartbeats:
        fd = os.memfd_create("hsmsignd-heartbeats", 0)
        os.ftruncate(fd, _SLOT.size * count)
        return cls(fd, count)

    def beat(self, index: int) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * (index - 1), time.monotonic_ns())

    def clear(self, index: int) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * (index - 1), 0)

    def last(self, index: int) -> int:
        """The monotonic time (ns) of process ``index``'s last beat; 0 before its first."""
        value: int = _SLOT.unpack_from(self._map, _SLOT.size * (index - 1))[0]
        return value


def start_beating(
    beats: Heartbeats, index: int, interval: float, check: Callable[[], bool]
) -> None:
    """Beats for process ``index`` every ``interval`` seconds while ``check()`` is true, from
    a daemon thread, until the process ends."""

    def run() -> None:
        failing = False
        while True:
            ok = check()
            if ok:
                beats.beat(index)
            if ok == failing:  # log the change, not every beat
                failing = not ok
                if failing:
                    log.error("self-check failed: no heartbeat until it passes again")
            time.sleep(interval)

    beats.beat(index)
    threading.Thread(target=run, name="heartbeat", daemon=True).start()
