"""Admission control in front of the token: a bounded number of calls per serving process,
token sessions handed out fairly across identities, and overload refused at once.

``AdmissionController`` is pure and thread-safe (no gRPC, no token): it keeps

- **places**: at most ``capacity + max_queued`` calls inside the process at once (running or
  waiting). A call that finds no place is refused at once (``Shed``, RESOURCE_EXHAUSTED).
  An identity may fill places nobody else wants, but when the process is full and a caller
  holds fewer than its fair share (the places divided by the identities inside), the newest
  waiting call of the identity most over its share gives its place up and is refused instead:
  no identity can keep another out.
- **turns**: ``capacity`` turns at the token (one per token session). Waiting calls get them
  in deficit round-robin order across identities, each turn costing what it signs (one digest,
  or one chunk of a batch), so one identity's batch of 10,000 digests cannot keep another's
  single digest waiting for more than one chunk. While another identity waits, no identity is
  given a turn beyond its share of the sessions (the sessions divided by the identities
  holding or wanting one); when nobody else waits it may use them all.
- a call whose caller goes (deadline, cancellation) while it waits leaves the queue and never
  runs.

The call pipeline's ``admission`` stage (``admitted``) takes a place for every call and one
turn for the whole call, except for batch methods (``PER_CHUNK_METHODS``), whose signing loop
takes a turn per chunk (``chunk_turns``) and so goes back to the queue between chunks.
``acquire`` blocks its thread; it is usable from any thread (a serving pool's or a batch
helper's), whatever serves the gRPC side.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from server.config import Config
from server.errors import Busy
from server.identity.model import Identity

log = logging.getLogger(__name__)

#: Turn cost units an identity is credited per round (deficit round-robin quantum): one chunk
#: of a batch (``server.api.deadlines.CHECK_EVERY`` digests), or as many single digests.
QUANTUM: Final = 16

#: Calls whose signing loop takes a turn per chunk (``chunk_turns``) instead of one turn for
#: the whole call: the batches, so that they go back to the queue between chunks.
PER_CHUNK_METHODS: Final = frozenset({"SignDigests", "SignChecksums"})

#: Longest wait between two looks at a waiting caller (has it cancelled?; a deadline wakes
#: it on time), and seconds between two log lines saying calls are being shed. Every waiting
#: call has a thread, so looking often costs the GIL much.
POLL_SECONDS: Final = 0.5
SHED_LOG_SECONDS: Final = 10.0


class Shed(Busy):
    """A call refused for lack of room (RESOURCE_EXHAUSTED): no place, its place given to a
    caller with fewer than its share, or no turn within the longest wait."""


@dataclass(eq=False)
class Ticket:
    """One call's place in the process."""

    who: str
    #: How messages name the caller (``Identity.describe()``).
    label: str
    #: Turns this call holds now.
    held: int = 0
    #: Whether the call has ever had a turn (a started call never gives up its place).
    started: bool = False
    #: Set when the place was given to another caller; the reason it was.
    shed: str | None = None
    left: bool = False


@dataclass(eq=False)
class _Waiter:
    ticket: Ticket
    cost: int
    granted: bool = False
    #: Made only for a call that has to wait (the uncontended path makes none).
    wake: threading.Event | None = None


@dataclass
class Counts:
    """What the controller did, for the log line a serving process writes when it stops."""

    admitted: int = 0
    #: Refused on arrival: no place left for the caller's identity.
    shed_full: int = 0
    #: Waiting calls that gave up their place to a caller with fewer than its share.
    shed_pushed_out: int = 0
    #: Waited longer than the longest wait (no deadline, or a longer one).
    shed_waited_too_long: int = 0
    #: Left the queue because the caller had gone (deadline passed, or cancelled).
    caller_gone: int = 0

    @property
    def shed(self) -> int:
        return self.shed_full + self.shed_pushed_out + self.shed_waited_too_long


class AdmissionController:
    """Places and token turns of one serving process (see the module docstring).
    Thread-safe."""

    def __init__(
        self, capacity: int, max_queued: int, max_wait_seconds: float, quantum: int = QUANTUM
    ) -> None:
        """``capacity`` turns (the token sessions), ``max_queued`` places beyond them, and
        at most ``max_wait_seconds`` of waiting for a turn. Raises ValueError for a capacity
        or quantum below 1 or a negative max_queued."""
        if capacity < 1 or max_queued < 0 or quantum < 1:
            raise ValueError("capacity and quantum must be at least 1, max_queued at least 0")
        self.capacity = capacity
        self.max_wait_seconds = max_wait_seconds
        self.places = capacity + max_queued
        self._quantum = quantum
        self._lock = threading.Lock()
        self._free = capacity
        self._inside: collections.Counter[str] = collections.Counter()
        self._holding: collections.Counter[str] = collections.Counter()
        # Waiting calls per identity (FIFO), and the identities with waiting calls in
        # round-robin order; the head's deficit and whether it has been credited this visit.
        self._queues: dict[str, collections.deque[_Waiter]] = {}
        self._round: collections.deque[str] = collections.deque()
        self._deficit: collections.Counter[str] = collections.Counter()
        self._credited: set[str] = set()
        self.counts = Counts()

    # -- places -------------------------------------------------------------------------------

    def enter(self, who: str, label: str) -> Ticket:
        """A place for a call of identity ``who``. Raises Shed when the process is full and
        ``who`` has its share of the places already (or nobody is over theirs)."""
        with self._lock:
            if sum(self._inside.values()) >= self.places:
                share = self._place_share(who)
                if self._inside[who] >= share or not self._push_out(share):
                    self.counts.shed_full += 1
                    raise Shed(
                        f"hsmsignd is full: {self.places} calls are running or waiting in this "
                        f"serving process, {self._inside[who]} of them {label}'s (its share is "
                        f"{share}); retry later"
                    )
            self._inside[who] += 1
            self.counts.admitted += 1
            return Ticket(who, label)

    def leave(self, ticket: Ticket) -> None:
        """Gives the call's place back (its turns must have been released)."""
        with self._lock:
            self._leave_locked(ticket)

    def _leave_locked(self, ticket: Ticket) -> None:
        if ticket.left:
            return
        ticket.left = True
        self._inside[ticket.who] -= 1
        if self._inside[ticket.who] <= 0:
            del self._inside[ticket.who]

    def _place_share(self, who: str) -> int:
        identities = len(self._inside) + (0 if who in self._inside else 1)
        return max(1, self.places // identities)

    def _push_out(self, share: int) -> bool:
        """Refuses the newest waiting, never started call of the identity most over
        ``share``; False when no identity over its share has one."""
        for who, inside in self._inside.most_common():
            if inside <= share:
                return False
            queue = self._queues.get(who, ())
            victim = next((w.ticket for w in reversed(queue) if not w.ticket.started), None)
            if victim is None:
                continue
            victim.shed = (
                f"refused to make room for another caller: {victim.label} had {inside} of "
                f"this serving process's {self.places} calls (its share is {share}); retry later"
            )
            # All of its waiting turns (a batch may wait on several threads at once).
            for w in [w for w in queue if w.ticket is victim]:
                self._unqueue(w)
                if w.wake is not None:
                    w.wake.set()
            self._leave_locked(victim)
            self.counts.shed_pushed_out += 1
            return True
        return False

    # -- turns --------------------------------------------------------------------------------

    def request(self, ticket: Ticket, cost: int = 1) -> _Waiter:
        """Queues the call for one turn of ``cost`` units (granted at once when one is free
        and nobody is ahead). Raises Shed when the call's place was given away."""
        with self._lock:
            if ticket.shed is not None:
                raise Shed(ticket.shed)
            w = _Waiter(ticket, max(1, cost))
            queue = self._queues.get(ticket.who)
            if queue is None:
                queue = self._queues[ticket.who] = collections.deque()
                self._round.append(ticket.who)
            queue.append(w)
            self._dispatch()
            if not w.granted:
                w.wake = threading.Event()
            return w

    def release(self, ticket: Ticket) -> None:
        """Gives back one turn the call holds; the next waiting call gets it."""
        with self._lock:
            self._release_locked(ticket)

    def _release_locked(self, ticket: Ticket) -> None:
        ticket.held -= 1
        self._holding[ticket.who] -= 1
        if self._holding[ticket.who] <= 0:
            del self._holding[ticket.who]
        self._free += 1
        self._dispatch()

    def withdraw(self, w: _Waiter, keep_granted: bool = False) -> bool:
        """Takes a waiting call out of the queue. A turn granted meanwhile is kept when
        ``keep_granted`` (True is returned), else given back."""
        with self._lock:
            if w.granted:
                if keep_granted:
                    return True
                self._release_locked(w.ticket)
            elif w.ticket.shed is None:
                self._unqueue(w)
            return False

    def acquire(
        self,
        ticket: Ticket,
        cost: int,
        check: Callable[[], None],
        deadline: float | None = None,
    ) -> None:
        """Blocks until the call has a turn of ``cost`` units (give it back with ``release``).

        ``check`` is called every ``POLL_SECONDS`` while waiting, and at ``deadline``
        (``time.monotonic()`` seconds; when the caller's deadline passes); whatever it raises
        (the caller has gone: DeadlineExceeded, Cancelled) takes the call out of the queue
        and is raised. Raises Shed when the call's place was given to another caller, or when no
        turn came within ``max_wait_seconds``."""
        w = self.request(ticket, cost)
        if w.wake is None:  # granted at once
            return
        end = time.monotonic() + self.max_wait_seconds
        while True:
            now = time.monotonic()
            wake_at = min(end, now + POLL_SECONDS)
            if deadline is not None and deadline > now:
                wake_at = min(wake_at, deadline)
            if w.wake.wait(max(0.0, wake_at - now)):
                break
            try:
                check()
            except BaseException:
                self.withdraw(w)
                with self._lock:
                    self.counts.caller_gone += 1
                raise
            if time.monotonic() >= end:
                if self.withdraw(w, keep_granted=True):
                    return
                with self._lock:
                    self.counts.shed_waited_too_long += 1
                raise Shed(
                    f"no token session came free for {self.max_wait_seconds:g}s "
                    "(token.session_wait_seconds); retry later"
                )
        if not w.granted:  # woken to be told its place went to another caller
            raise Shed(ticket.shed or "refused to make room for another caller; retry later")

    def _unqueue(self, w: _Waiter) -> None:
        queue = self._queues[w.ticket.who]
        queue.remove(w)
        if not queue:
            self._drop_from_round(w.ticket.who)

    def _drop_from_round(self, who: str) -> None:
        del self._queues[who]
        self._round.remove(who)
        self._deficit.pop(who, None)
        self._credited.discard(who)

    def _session_share(self) -> int:
        identities = len(set(self._holding) | set(self._queues))
        return max(1, math.ceil(self.capacity / identities))

    def _dispatch(self) -> None:
        """Hands free turns to waiting calls: deficit round-robin over the identities with
        waiting calls, among those below their session share when any of them waits."""
        while self._free > 0 and self._round:
            share = self._session_share()
            below = [who for who in self._round if self._holding[who] < share]
            eligible = set(below) if below else set(self._round)
            w = self._next(eligible)
            self._queues[w.ticket.who].popleft()
            if not self._queues[w.ticket.who]:
                self._drop_from_round(w.ticket.who)
            self._free -= 1
            self._holding[w.ticket.who] += 1
            w.ticket.held += 1
            w.ticket.started = True
            w.granted = True
            if w.wake is not None:
                w.wake.set()

    def _next(self, eligible: set[str]) -> _Waiter:
        """The waiting call whose turn it is (deficit round-robin, head of ``_round`` first)."""
        while True:
            who = self._round[0]
            if who in eligible:
                if who not in self._credited:
                    self._deficit[who] += self._quantum
                    self._credited.add(who)
                w = self._queues[who][0]
                if self._deficit[who] >= w.cost:
                    self._deficit[who] -= w.cost
                    return w
            self._credited.discard(who)
            self._round.rotate(-1)

    # -- what it holds ------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """(places, turns held, calls waiting) per identity."""
        with self._lock:
            return (
                dict(self._inside),
                dict(self._holding),
                {who: len(q) for who, q in self._queues.items()},
            )

    def summary(self) -> str:
        with self._lock:
            c = self.counts
            return (
                f"admission: {c.shed} call{'' if c.shed == 1 else 's'} shed "
                f"(RESOURCE_EXHAUSTED: {c.shed_full} found no place, {c.shed_pushed_out} "
                f"gave their place to another caller, {c.shed_waited_too_long} waited too "
                f"long); {c.caller_gone} left the queue because their caller had gone; "
                f"{c.admitted} admitted"
            )


# -- the pipeline's admission stage -----------------------------------------------------------


class _ShedLog:
    """At most one warning per SHED_LOG_SECONDS while calls are being shed (the counts go
    into the line each serving process logs when it stops)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since = 0
        self._last = 0.0

    def note(self, reason: str) -> None:
        with self._lock:
            self._since += 1
            now = time.monotonic()
            if now - self._last < SHED_LOG_SECONDS:
                return
            count, self._since, self._last = self._since, 0, now
        log.warning(
            "shedding load: %d call(s) refused RESOURCE_EXHAUSTED, latest: %s", count, reason
        )


@dataclass(frozen=True)
class _CallTurns:
    """The running call's ticket, for its signing loops (also on batch helper threads)."""

    controller: AdmissionController
    ticket: Ticket
    check: Callable[[], None]
    #: When the caller's deadline passes (``time.monotonic()``), if it has one.
    deadline: float | None
    #: The call holds one turn for its whole run (not a PER_CHUNK_METHODS call).
    whole_call: bool

    @contextlib.contextmanager
    def turn(self, cost: int) -> Iterator[None]:
        if self.whole_call:  # its turn is held already
            yield
            return
        _acquire(self.controller, self.ticket, cost, self.check, self.deadline)
        try:
            yield
        finally:
            self.controller.release(self.ticket)


_installed: AdmissionController | None = None
_shed_log = _ShedLog()
_call: contextvars.ContextVar[_CallTurns | None] = contextvars.ContextVar("admission", default=None)


def install(controller: AdmissionController | None) -> None:
    """Sets this process's controller (``server.serve``); None admits every call at once."""
    global _installed
    _installed = controller


def installed() -> AdmissionController | None:
    return _installed


@contextlib.contextmanager
def admitted(
    method: str,
    identity: Identity | None,
    check: Callable[[], None],
    time_remaining: float | None,
) -> Iterator[None]:
    """Runs the ``with`` body as an admitted call of ``identity``: with a place, and,
    unless ``method`` is in PER_CHUNK_METHODS, one turn at the token for the whole body.

    ``check`` raises once the caller has gone (``server.api.deadlines.batch_check()``);
    ``time_remaining`` is the caller's (seconds; None: no deadline).
    Raises Shed (RESOURCE_EXHAUSTED) when there
    is no room, whatever ``check`` raises when the caller goes while the call waits."""
    controller = _installed
    if controller is None:
        yield
        return
    who, label = (
        ("-", "an unidentified caller")
        if identity is None
        else (
            identity.limit_key,
            identity.describe(),
        )
    )
    try:
        ticket = controller.enter(who, label)
    except Shed as e:
        _shed_log.note(str(e))
        raise
    deadline = None if time_remaining is None else time.monotonic() + time_remaining
    turns = _CallTurns(controller, ticket, check, deadline, method not in PER_CHUNK_METHODS)
    reset = _call.set(turns)
    try:
        if turns.whole_call:
            _acquire(controller, ticket, 1, check, deadline)
            try:
                yield
            finally:
                controller.release(ticket)
        else:
            yield
    finally:
        _call.reset(reset)
        controller.leave(ticket)


def _acquire(
    controller: AdmissionController,
    ticket: Ticket,
    cost: int,
    check: Callable[[], None],
    deadline: float | None,
) -> None:
    try:
        controller.acquire(ticket, cost, check, deadline)
    except Shed as e:
        _shed_log.note(str(e))
        raise


@contextlib.contextmanager
def _no_turn(cost: int) -> Iterator[None]:
    yield


def chunk_turns() -> Callable[[int], contextlib.AbstractContextManager[None]]:
    """For the running call's batch loop (also usable from its helper threads): ``with
    turn(cost):`` around each chunk's token work waits for a turn in fair order and gives it
    back after. Outside an admitted call, or in a call that holds a turn for its whole run,
    the turn is given at once. Raises, from ``turn``, what ``acquire`` raises."""
    turns = _call.get()
    return _no_turn if turns is None else turns.turn


def summary() -> str:
    """The installed controller's counts, for the line a serving process logs when it stops."""
    return "admission: no controller installed" if _installed is None else _installed.summary()


def controller_for(cfg: Config) -> AdmissionController:
    """A serving process's controller: a turn per token session, [server.limits]
    max_queued_calls places beyond them, waits bounded by token.session_wait_seconds."""
    return AdmissionController(
        cfg.token.sessions, cfg.server.limits.max_queued_calls, cfg.token.session_wait_seconds
    )


def serving_threads(cfg: Config) -> int:
    """Threads a serving process needs: server.threads for the calls being refused or
    answered without the token, and one for each call that may be blocked in the controller
    (waiting for or holding a turn). A call being received holds no thread: the event loop
    reads it (docs/adr/0008-serving-model.md). (With gRPC's synchronous server, which gave a
    call its thread when its headers arrived, twice as many were needed: another caller's
    call waited about 2 s for a thread behind 400 of one identity's streams.)"""
    return cfg.server.threads + cfg.token.sessions + cfg.server.limits.max_queued_calls
