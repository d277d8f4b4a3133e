"""Calls whose caller has gone are not run: the caller's deadline and cancellation, checked
before a handler starts (the call pipeline's ``deadline`` stage) and between the digests of a batch.

gRPC cancels a call on the server once its deadline passes or its client cancels it, but the
handler's thread keeps going unless it looks: a 10,000-digest batch kept the token busy for
11 s after a client with a 0.5 s deadline had gone, and a call that arrived already expired
was run and logged as OK. ``run`` refuses such a call before the handler starts (no token
work at all) and records the call for ``batch_check``, which the signing loops call between
chunks of ``CHECK_EVERY`` digests.

``tally`` counts the signatures this process made and the calls it did not run or stopped
part-way; each serving process logs it when it stops (until the audit stream records calls).
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar

from server import metrics
from server.errors import Cancelled, DeadlineExceeded, ServerError

T = TypeVar("T")

#: Digests a batch signs between two looks at its caller: at 1-2 ms per RSA-2048 signature a
#: batch stops within a few tens of milliseconds of its deadline, for a negligible cost.
CHECK_EVERY = 16

#: A call with less time left than this counts as expired: gRPC keeps deadlines in whole
#: milliseconds, so a call sent with a 1 microsecond deadline arrives with up to a millisecond
#: "left", and no answer reaches its caller in that time anyway.
MIN_REMAINING_SECONDS = 0.002


class Caller(Protocol):
    """What a call knows of its caller (``grpc.ServicerContext`` is one)."""

    def is_active(self) -> bool: ...

    def time_remaining(self) -> float | None: ...


class _Tally:
    """Counts for the line a serving process logs when it stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.signatures = 0
        self.not_started = 0
        self.stopped = 0
        self.unread = 0

    def signed(self, n: int) -> None:
        with self._lock:
            self.signatures += n
        metrics.signed(n)

    def caller_gone(self, started: bool) -> None:
        with self._lock:
            if started:
                self.stopped += 1
            else:
                self.not_started += 1

    def gone_unread(self, method: str) -> None:
        """A call whose caller went before its request had been read (``server.api.dispatch``):
        gRPC ended it, so it never reached the pipeline, its log line or the audit trail; it
        is counted here and in the metrics instead (a flood of such calls costs no record)."""
        with self._lock:
            self.unread += 1
        metrics.gone_unread(method)

    def summary(self) -> str:
        with self._lock:
            return (
                f"{self.signatures} signatures made; calls whose caller had gone (deadline "
                f"passed or cancelled): {self.not_started} not run, {self.stopped} stopped "
                f"part-way, {self.unread} gone before their request was read"
            )


#: This process's counts.
tally = _Tally()

#: The caller of the call this thread is running (set by ``run``).
_caller: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def _gone(caller: Caller) -> ServerError | None:
    remaining = caller.time_remaining()
    if remaining is not None and remaining < MIN_REMAINING_SECONDS:
        return DeadlineExceeded("the caller's deadline passed; the call was not completed")
    if not caller.is_active():
        return Cancelled("the caller cancelled the call; it was not completed")
    return None


def run(caller: Caller, proceed: Callable[[], T]) -> T:
    """Runs ``proceed()`` (the rest of the call: ``server.api.pipeline``'s ``deadline``
    stage) unless the caller has already gone, and lets ``batch_check`` see the caller.

    Raises DeadlineExceeded or Cancelled when the caller had gone before the handler started
    or (from ``batch_check``) while it ran; else whatever ``proceed`` raises."""
    gone = _gone(caller)
    if gone is not None:
        tally.caller_gone(started=False)
        raise gone
    reset = _caller.set(caller)
    try:
        return proceed()
    except (DeadlineExceeded, Cancelled):
        tally.caller_gone(started=True)
        raise
    finally:
        _caller.reset(reset)


def _never_gone() -> None:
    return None


def batch_check() -> Callable[[], None]:
    """A check for the current call, to call between the items of a batch (also from helper
    threads): raises DeadlineExceeded or Cancelled once the caller has gone. Outside a call
    (``run`` not active on this thread) the check never raises."""
    caller = _caller.get()
    if caller is None:
        return _never_gone

    def check() -> None:
        gone = _gone(caller)
        if gone is not None:
            raise gone

    return check
