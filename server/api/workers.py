"""A few serving threads that take complete calls in fair order across callers
(docs/adr/0009-fair-serving-threads.md).

Before, every call in flight had a serving thread of its own, and all but one per token
session slept until the admission controller woke it: each call cost two more thread
hand-offs, and unary signing went from 1.3 to 2.0 ms of daemon CPU per call. Here a call
waits as a job, not on a thread: ``server.threads`` threads run the jobs, and a thread that
finishes one takes the next at once, without sleeping, in round-robin order across callers.

A job is queued under the name the event loop knows its caller by (``caller_key`` in
``server.api.dispatch``: its TLS client certificate, else its bearer token, else its address);
the verified identity, its policy and its share of the token sessions stay the call
pipeline's, on the thread. The waiting room's bound and fair shares are those of an
``AdmissionController`` with one turn per thread: a caller that finds no place, or whose
place is given to a caller with fewer than its share, is refused (``Shed``), and the job's
future says so; the dispatcher then has the call refused through the pipeline, so that it is
logged and audited with its identity like any refusal.
"""

from __future__ import annotations

import collections
import contextvars
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from server.api.admission import AdmissionController, Shed, Ticket, Waiter

#: Set while the pipeline runs a call that the waiting room refused (``Shed``): its
#: ``admission`` stage refuses the call with it, after ``access`` has named the caller.
refused_by_room: contextvars.ContextVar[Shed | None] = contextvars.ContextVar(
    "refused_by_room", default=None
)


def run_refused(shed: Shed, run: Callable[[], Any]) -> Any:
    """Runs ``run`` (the call's pipeline) so that it refuses the call with ``shed``."""
    reset = refused_by_room.set(shed)
    try:
        return run()
    finally:
        refused_by_room.reset(reset)


class _State(Enum):
    QUEUED = auto()
    READY = auto()  # granted a thread, not yet taken
    RUNNING = auto()
    WITHDRAWN = auto()  # its caller went before a thread took it
    SHED = auto()  # its place was given to another caller


@dataclass(eq=False)
class Job:
    """One call waiting for, or running on, a serving thread."""

    run: Callable[[], Any]
    ticket: Ticket
    future: Future[Any] = field(default_factory=Future)
    waiter: Waiter | None = None
    state: _State = _State.QUEUED


class FairWorkers:
    """``threads`` serving threads fed by a bounded waiting room of ``max_queued`` calls,
    fair across callers (see the module docstring). Thread-safe."""

    def __init__(self, threads: int, max_queued: int, name: str = "rpc") -> None:
        # One turn per thread; a job waits as long as its caller does (no wait bound here:
        # the caller's deadline or cancel withdraws it), and every job costs one turn.
        self._room = AdmissionController(threads, max_queued, math.inf, quantum=1)
        self._cond = threading.Condition()
        self._ready: collections.deque[Job] = collections.deque()
        self._idle = 0
        self._stopping = False
        #: Set on a serving thread while it gives its turn back: the job that gets the turn
        #: is then taken by this same thread, so no sleeping thread needs waking for it.
        self._local = threading.local()
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(self, who: str, label: str, run: Callable[[], Any]) -> Job:
        """Queues ``run`` for caller ``who`` (``label`` names it in messages). The job's
        future gets ``run``'s result or exception, or Shed when the job's place is given to
        another caller before it ran. Raises Shed when there is no place for ``who``."""
        job = Job(run, self._room.enter(who, label))
        job.waiter = self._room.request(job.ticket, notify=lambda w: self._woken(job, w))
        return job

    def withdraw(self, job: Job) -> bool:
        """Takes a job whose caller has gone out of the room. True when it never ran (and
        never will); False when a thread has it already or its place was given away."""
        with self._cond:
            if job.state not in (_State.QUEUED, _State.READY):
                return False
            queued = job.state is _State.QUEUED
            job.state = _State.WITHDRAWN
        if queued and job.waiter is not None and not self._room.withdraw(job.waiter, True):
            self._room.leave(job.ticket)  # out of the queue before any thread was given
        # Granted meanwhile (or READY): the thread that takes it gives its turn back.
        return True

    def snapshot(self) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """(places, threads held, calls waiting) per caller."""
        return self._room.snapshot()

    def stop(self) -> None:
        """Lets the threads end once no job is ready (jobs still queued are not run)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # -- on the controller's lock -------------------------------------------------------------

    def _woken(self, job: Job, w: Waiter) -> None:
        with self._cond:
            if w.granted:
                if job.state is _State.QUEUED:
                    job.state = _State.READY
                self._ready.append(job)  # a WITHDRAWN one only to give its turn back
                if self._idle and not getattr(self._local, "releasing", False):
                    self._cond.notify()
                return
            if job.state is _State.QUEUED:  # its place went to a caller below its share
                job.state = _State.SHED
                shed = Shed(
                    job.ticket.shed or "refused to make room for another caller; retry later",
                    "shed_pushed_out",
                )
                job.future.set_exception(shed)  # never cancelled: the dispatcher shields it

    # -- the serving threads -----------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._ready:
                    if self._stopping:
                        return
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                job = self._ready.popleft()
                run = job.state is _State.READY
                if run:
                    job.state = _State.RUNNING
            if run and job.future.set_running_or_notify_cancel():
                try:
                    result = job.run()
                except BaseException as e:  # the job's own failure is its caller's answer
                    job.future.set_exception(e)
                else:
                    job.future.set_result(result)
            self._local.releasing = True
            try:
                self._room.release(job.ticket)
            finally:
                self._local.releasing = False
            self._room.leave(job.ticket)
