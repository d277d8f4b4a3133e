"""A time limit on every PKCS#11 call (issue 16, "deadlines everywhere").

A Python thread inside a C call cannot be interrupted, and a hung module may never return.
So the watchdog does not try to stop the call; it decides what the daemon does around it
(docs/operations.md, "Token call limits"):

1. every call on a pool session (``server.pkcs11.session.Session``'s methods) registers here
   while it runs, with its limit: ``token.call_timeout_seconds``, or
   ``token.keygen_timeout_seconds`` for key-pair generation;
2. a thread looks at the running calls every quarter of a second or so; a call past its limit
   is marked overdue: its session is lost (``Token.session`` closes it and opens a new one
   if the call ever returns, never lends it again), the call fails with UNAVAILABLE when it
   returns (its outcome is not trusted), and the process reports NOT_SERVING while any call
   is overdue, so load balancers and clients' health checks send calls elsewhere;
3. a call still running ``token.stuck_exit_seconds`` after its limit means the module is
   wedged: the process logs one line and exits with ``EXIT_TOKEN_HUNG`` (75) at once (a clean
   stop would hang on the same module). The supervisor, systemd or Kubernetes starts a new
   process, whose fresh module initialisation is the only cure a wedged C library has.

The heartbeat that the supervisor reads (``server.heartbeat``) asks ``alive``: the
watchdog's own thread must have looked within a few periods, so a process whose watchdog
cannot run (the interpreter frozen inside a C call that holds the GIL, a SIGSTOP) is replaced
from outside.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from server import logsink
from server.errors import EXIT_TOKEN_HUNG, TokenUnavailable

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger(__name__)

#: The watchdog's thread looks at the running calls this often at most (seconds).
MAX_SCAN_SECONDS = 0.25


class CallOverdue(TokenUnavailable):
    """A token call ran past its limit: UNAVAILABLE (retry), and its session is lost."""


@dataclass
class Watch:
    """One running token call."""

    what: str
    started: float
    limit: float
    #: The config key that sets ``limit``, for the log line.
    setting: str
    overdue: bool = False

    def running_for(self) -> float:
        return time.monotonic() - self.started


class CallWatchdog:
    """The running token calls of one process and the thread that times them. Thread-safe.

    ``exit`` is what ends the process when a call is stuck (``os._exit``; tests of this
    module pass their own).
    """

    def __init__(
        self,
        call_timeout: float,
        keygen_timeout: float,
        stuck_exit: float,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        self.call_timeout, self.keygen_timeout, self.stuck_exit = (
            call_timeout,
            keygen_timeout,
            stuck_exit,
        )
        self._exit = exit
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._running: dict[int, Watch] = {}
        self._overdue_now = 0
        #: Calls that ran past their limit since start (their sessions were given up).
        self.overdue_total = 0
        self._listeners: list[Callable[[bool], None]] = []
        self._period = min(MAX_SCAN_SECONDS, call_timeout / 4)
        self._last_scan = time.monotonic()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="token-watchdog", daemon=True)
        self._thread.start()

    # -- what the token code calls --------------------------------------------------------

    @contextlib.contextmanager
    def watching(self, what: str, *, keygen: bool = False) -> Iterator[Watch]:
        """Registers one token call for as long as the block runs; the block reads
        ``watch.overdue`` afterwards to learn whether its limit passed."""
        if keygen:
            watch = Watch(what, time.monotonic(), self.keygen_timeout, "keygen_timeout_seconds")
        else:
            watch = Watch(what, time.monotonic(), self.call_timeout, "call_timeout_seconds")
        key = next(self._ids)
        with self._lock:
            self._running[key] = watch
        try:
            yield watch
        finally:
            with self._lock:
                del self._running[key]
                recovered = watch.overdue and self._overdue_now == 1
                if watch.overdue:
                    self._overdue_now -= 1
            if recovered:
                log.warning(
                    "the token answered again (%s returned after %.1fs); health SERVING",
                    watch.what,
                    watch.running_for(),
                )
                self._notify(True)

    def run(self, what: str, call: Callable[[], T], *, keygen: bool = False) -> T:
        """Runs ``call`` registered as one token call. Raises CallOverdue when its limit
        passed before it returned, whatever it returned or raised (its outcome is not
        trusted); else what ``call`` raises."""
        with self.watching(what, keygen=keygen) as watch:
            try:
                value = call()
            except BaseException:
                if not watch.overdue:
                    raise
        if watch.overdue:
            raise CallOverdue(
                f"the token took {watch.running_for():.1f}s for {what}, past its limit of "
                f"{watch.limit:g}s (token.{watch.setting}); retry"
            )
        return value

    def on_health(self, listener: Callable[[bool], None]) -> None:
        """Calls ``listener(False)`` when a call becomes overdue, ``listener(True)`` when the
        last overdue call has returned."""
        self._listeners.append(listener)

    def healthy(self) -> bool:
        """No call is past its limit."""
        return self._overdue_now == 0

    def alive(self) -> bool:
        """The watchdog's thread has looked at the running calls recently."""
        return time.monotonic() - self._last_scan < max(2.0, 8 * self._period)

    def close(self) -> None:
        self._closed.set()

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._closed.wait(self._period):
            self._last_scan = time.monotonic()
            self.scan()

    def scan(self) -> None:
        """Marks calls past their limit overdue; exits the process when one is stuck."""
        newly: list[Watch] = []
        stuck: Watch | None = None
        with self._lock:
            for watch in self._running.values():
                running_for = watch.running_for()
                if not watch.overdue and running_for > watch.limit:
                    watch.overdue = True
                    self._overdue_now += 1
                    self.overdue_total += 1
                    newly.append(watch)
                if running_for > watch.limit + self.stuck_exit:
                    stuck = watch
        for watch in newly:
            log.error(
                "token call hung: %s has run %.1fs, past its limit of %gs "
                "(token.%s); its session is given up, the call fails with UNAVAILABLE if it "
                "returns, health NOT_SERVING",
                watch.what,
                watch.running_for(),
                watch.limit,
                watch.setting,
            )
        if newly:
            self._notify(False)
        if stuck is not None and not self._closed.is_set():
            self._give_up(stuck)

    def _give_up(self, watch: Watch) -> None:
        line = (
            f"the token has not answered {watch.what} for {watch.running_for():.0f}s "
            f"(limit {watch.limit:g}s + token.stuck_exit_seconds {self.stuck_exit:g}s): "
            f"exiting with code {EXIT_TOKEN_HUNG} so that a new process initialises the "
            "module again"
        )
        log.critical("%s", line)
        logsink.flush_all(1.0)
        self._closed.set()
        self._exit(EXIT_TOKEN_HUNG)

    def _notify(self, healthy: bool) -> None:
        for listener in self._listeners:
            try:
                listener(healthy)
            except Exception:  # a health listener must never stop the watchdog
                log.exception("token health listener failed")


class _Timed(Protocol):
    def timed(self, call: Callable[[], T], *, keygen: bool = False) -> T: ...


S = TypeVar("S", bound=_Timed)


def token_call(
    *, keygen: bool = False
) -> Callable[[Callable[Concatenate[S, P], T]], Callable[Concatenate[S, P], T]]:
    """A method decorator: the method runs through ``self.timed`` (one timed token call;
    ``keygen``: under the key-generation limit)."""

    def decorate(method: Callable[Concatenate[S, P], T]) -> Callable[Concatenate[S, P], T]:
        def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            return self.timed(lambda: method(self, *args, **kwargs), keygen=keygen)

        run.__name__, run.__doc__ = method.__name__, method.__doc__
        return run

    return decorate
