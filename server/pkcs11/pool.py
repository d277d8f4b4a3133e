"""The pool of token sessions that calls borrow, lent in arrival order."""

from __future__ import annotations

import collections
import queue
import threading
from typing import Generic, TypeVar

S = TypeVar("S")


class _Waiter(Generic[S]):
    __slots__ = ("gate", "session")

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.session: S | None = None


class SessionPool(Generic[S]):
    """Sessions lent in arrival order.

    A returned session goes straight to the longest-waiting caller, never to one that arrives
    later (a plain queue lets newcomers take it first, so under load a waiter could lose
    several times in a row and batch calls showed a long tail). Uncontended, lending and
    returning cost one lock each.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[S] = []
        self._waiters: collections.deque[_Waiter[S]] = collections.deque()

    def put(self, s: S) -> None:
        with self._lock:
            if self._waiters:
                w = self._waiters.popleft()
                w.session = s
                w.gate.release()
            else:
                self._free.append(s)

    def get(self, timeout: float) -> S:
        """Raises queue.Empty when no session came within ``timeout`` seconds."""
        with self._lock:
            if self._free:
                return self._free.pop()
            w: _Waiter[S] = _Waiter()
            self._waiters.append(w)
        if w.gate.acquire(timeout=timeout) and w.session is not None:
            return w.session
        with self._lock:
            if w.session is not None:  # handed over just as the wait timed out
                return w.session
            self._waiters.remove(w)
        raise queue.Empty

    def get_nowait(self) -> S:
        """Raises queue.Empty when no session is free."""
        with self._lock:
            if self._free:
                return self._free.pop()
        raise queue.Empty
