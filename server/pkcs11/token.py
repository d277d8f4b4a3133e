"""The PKCS#11 token: the loaded module, the login session, the session pool, and recovery.

One ``Token`` per process owns the loaded module, one logged-in session kept for the life of
the module (login is per application: docs/design-facts.md fact 2), and a bounded pool of
further sessions that calls borrow. Whether the pool's sessions run in parallel depends on the
module: python-pkcs11 calls ``C_Initialize(NULL)``, which tells a module that it will not be
called from several threads, and SoftHSM2 then disables its locking (fact 1). Through p11-kit's
proxy the real module is initialised with OS locking, so ``threading = "parallel"``; any other
module runs ``"serialized"`` (one lock around every call) unless the operator says it is
thread-safe (docs/adr/0001-pkcs11-threading.md).

Faults (``server.pkcs11.errors.Outcome``): a lost session is reopened; a lost login is logged
in again once; a device or module fault puts the token in ``RECOVERING`` and one thread
finalizes and re-initialises the module, finds the token again by its label or serial, logs in
and rebuilds the pool, with backoff, until it works (every call meanwhile gets UNAVAILABLE at
once); a refused PIN puts it in ``PIN_REFUSED`` for good (the serving process stops, exit 77).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any, Final, TypeVar

import pkcs11
import pkcs11.exceptions as p11e

from server.config import TokenConfig
from server.errors import (
    Busy,
    ConfigError,
    PinRefused,
    ServerError,
    StartupError,
    TokenNotFound,
    TokenUnavailable,
)
from server.pkcs11 import intercept
from server.pkcs11.errors import (
    PIN_REFUSED,
    Outcome,
    TokenFault,
    classify,
    outcome,
    pin_refused,
)
from server.pkcs11.pool import SessionPool
from server.pkcs11.session import Session
from server.pkcs11.watchdog import CallOverdue, CallWatchdog

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between recovery attempts: the first at once, then doubling up to the last.
RECOVERY_BACKOFF: Final = (0.5, 10.0)
#: Seconds a recovery waits for the calls still inside the module to return before it
#: finalizes it (a call that hangs longer makes that attempt fail; the next one waits again).
DRAIN_SECONDS: Final = 10.0
#: A fault this soon after a recovery waits out a growing backoff before the next one.
FLAPPING_SECONDS: Final = 30.0
#: Seconds a call that hit a device fault waits for the recovery before its one retry.
RETRY_WAIT_SECONDS: Final = 2.0


class TokenState(Enum):
    """Whether calls may use the token."""

    USABLE = "usable"
    #: A device or module fault: the module is being re-initialised; calls get UNAVAILABLE.
    RECOVERING = "recovering"
    #: The token refused the PIN: nothing tries it again; the serving process stops.
    PIN_REFUSED = "pin-refused"
    CLOSED = "closed"


#: Called (outside every lock) when the state changes: (new state, one line saying why).
Listener = Callable[[TokenState, str], None]


class Token:
    """The loaded module, the login session, the session pool and their recovery.
    Thread-safe."""

    def __init__(self, config: TokenConfig) -> None:
        """Loads the module, finds the token, logs in once and opens the pool's sessions.

        Raises StartupError (module missing or unloadable, several tokens match),
        PinRefused (PIN incorrect, locked or expired), TokenNotFound, ConfigError (PIN source
        unreadable) or TokenUnavailable.
        """
        self.config = config
        self._serial_lock: threading.Lock | None = (
            threading.Lock() if config.threading == "serialized" else None
        )
        self._pool: SessionPool[Session] = SessionPool()
        self._cond = threading.Condition()
        self._state = TokenState.USABLE
        self._reason = ""
        self._pin_refused: PinRefused | None = None
        self._in_use = 0  # sessions lent out: calls inside the module
        self._epoch = 0  # bumped by every rebuild; sessions of an older epoch are dropped
        self._listeners: list[Listener] = []
        self._recovery: threading.Thread | None = None
        self._stop = threading.Event()
        self._login_lock = threading.Lock()
        self._relogged_at = 0.0
        self._recovered_at = -FLAPPING_SECONDS
        self._flap_delay = 0.0
        #: Times every call on the pool's sessions (server/pkcs11/watchdog.py).
        self.watchdog = CallWatchdog(
            config.call_timeout_seconds, config.keygen_timeout_seconds, config.stuck_exit_seconds
        )
        for k, v in config.environment.items():
            os.environ[k] = v
        if not config.module.exists():
            raise StartupError(f"PKCS#11 module not found: {config.module} (token.module)")
        try:
            self._lib = intercept.module(pkcs11.lib(str(config.module)))
        except p11e.PKCS11Error as e:
            raise StartupError(f"cannot load PKCS#11 module {config.module}: {e}") from None
        try:
            self._token = self._find_token()
        except p11e.NoSuchToken:
            raise TokenNotFound(
                f"no token with {config.describe_token()} in module {config.module}"
            ) from None
        except p11e.MultipleTokensReturned:
            raise StartupError(
                f"several tokens have {config.describe_token()}; select by serial instead"
            ) from None
        try:
            self._login = self._log_in()
        except PIN_REFUSED as e:
            raise pin_refused(e, config.pin.describe()) from None
        except p11e.UserPinNotInitialized:
            raise StartupError(
                "the token's user PIN is not initialised (is the token still being set up?)"
            ) from None
        except p11e.PKCS11Error as e:
            raise StartupError(f"cannot log in to the token: {type(e).__name__}") from None
        self._fill_pool()
        log.info(
            "token %s: %d sessions, threading=%s, module %s",
            config.describe_token(),
            config.sessions,
            config.threading,
            config.module,
        )

    # -- what the rest of the daemon sees ------------------------------------------------

    @property
    def label(self) -> str:
        return str(self._token.label)

    @property
    def state(self) -> TokenState:
        return self._state

    @property
    def usable(self) -> bool:
        return self._state is TokenState.USABLE

    @property
    def pin_refusal(self) -> PinRefused | None:
        """The PinRefused a re-login got, once the token is in PIN_REFUSED."""
        return self._pin_refused

    def add_listener(self, listener: Listener) -> None:
        """Calls ``listener(state, why)`` on every state change (from the thread that made
        it), and once now with the current state."""
        with self._cond:
            self._listeners.append(listener)
            state, why = self._state, self._reason
        listener(state, why)

    def wait_usable(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the token to be usable; whether it is."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._state is not TokenState.RECOVERING, timeout
            ) and (self._state is TokenState.USABLE)

    def reinitialize(self, reason: str, wait: float) -> bool:
        """Treats the token as faulty (the key ring read lost keys it had: a SoftHSM2 token
        that failed one read reports nothing ever after, docs/design-facts.md fact 9):
        re-initialises the module as for a device fault and waits up to ``wait`` seconds
        for it. Returns whether the token is usable again."""
        self._fault(reason)
        return self.wait_usable(wait)

    # -- borrowing a session -------------------------------------------------------------

    def _refusal(self) -> ServerError:
        if self._state is TokenState.PIN_REFUSED:
            return TokenUnavailable("the token refused the PIN; this serving process is stopping")
        if self._state is TokenState.CLOSED:
            return TokenUnavailable("the daemon is shutting down")
        return TokenUnavailable("the token is recovering; retry")

    def _borrow(self) -> Session:
        with self._cond:
            if self._state is not TokenState.USABLE:
                raise self._refusal()
        deadline = time.monotonic() + self.config.session_wait_seconds
        while True:
            try:
                s = self._pool.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                with self._cond:
                    if self._state is not TokenState.USABLE:
                        raise self._refusal() from None
                raise Busy(
                    f"all {self.config.sessions} token sessions stayed busy for "
                    f"{self.config.session_wait_seconds:g}s; retry later"
                ) from None
            with self._cond:
                if s.epoch != self._epoch:
                    continue  # a session of the module before its re-initialisation: dropped
                if self._state is not TokenState.USABLE:
                    self._pool.put(s)  # the recovery closes it
                    raise self._refusal()
                self._in_use += 1
                return s

    def _give_back(self, s: Session) -> None:
        with self._cond:
            self._in_use -= 1
            current = s.epoch == self._epoch
            if self._in_use == 0:
                self._cond.notify_all()
        if current:
            self._pool.put(s)

    @contextlib.contextmanager
    def session(self, what: str) -> Iterator[Session]:
        """Borrows a session for one operation; classifies PKCS#11 errors raised inside.

        Raises TokenUnavailable at once while the token recovers (or after a refused PIN),
        Busy when no session frees up in time, TokenFault (UNAVAILABLE) when the session,
        the login or the device fails (after starting what repairs it), PinRefused when a
        re-login is refused, and the classified error (``server.pkcs11.errors.classify``)
        for any other refusal.
        """
        s = self._borrow()
        lock = self._serial_lock or contextlib.nullcontext()
        s.purpose = what
        try:
            with lock:
                try:
                    yield s
                except CallOverdue:
                    s = self._replace(s)  # never lent again: the module may still be using it
                    raise
                except ServerError:
                    raise
                except p11e.PKCS11Error as e:
                    s = self._handle(e, s, what)
                    raise classify(e, what) from None
        finally:
            self._give_back(s)

    def run(self, what: str, op: Callable[[Session], T], *, retry: bool = True) -> T:
        """``op`` on a borrowed session. With ``retry`` (calls without side effects: signing,
        unwrap, reads), a session, login or device fault is retried once on a fresh session,
        after the recovery when the device failed. Raises what ``session`` raises."""
        for attempt in (1, 2):
            try:
                with self.session(what) as s:
                    return op(s)
            except TokenFault as e:
                if not retry or attempt == 2:
                    if attempt == 2 and e.outcome is Outcome.SESSION:
                        self._fault(f"{e} again on a fresh session")
                    raise
                if (e.outcome is Outcome.DEVICE or not self.usable) and not self.wait_usable(
                    RETRY_WAIT_SECONDS
                ):
                    raise
        raise AssertionError("unreachable")

    def _handle(self, e: p11e.PKCS11Error, s: Session, what: str) -> Session:
        """Starts what repairs the fault ``e`` raised during ``what``; the session to give back."""
        kind = outcome(e)
        name = type(e).__name__
        if kind is Outcome.SESSION:
            log.warning("token session lost during %s (%s); reopening it", what, name)
            return self._replace(s)
        if kind is Outcome.LOGIN:
            self._relogin(f"{name} during {what}")
        elif kind is Outcome.DEVICE:
            self._fault(f"{name} during {what}")
        return s

    def _replace(self, s: Session) -> Session:
        with contextlib.suppress(Exception):
            s.raw.close()
        try:
            fresh = Session(self._token.open(rw=True), self.watchdog, s.epoch)
        except p11e.PKCS11Error as e:
            self._fault(f"cannot reopen a token session ({type(e).__name__})")
            return s
        return fresh

    # -- login, faults and recovery --------------------------------------------------------

    def _find_token(self) -> Any:
        return self._lib.get_token(token_label=self.config.label, token_serial=self.config.serial)

    def _log_in(self) -> Any:
        """A new logged-in session (kept: closing it would log every session out). Raises
        ConfigError (PIN source unreadable) or the PKCS#11 error."""
        pin = self.config.pin.read()
        try:
            return self._token.open(user_pin=pin, rw=True)
        finally:
            del pin

    def _fill_pool(self) -> None:
        for _ in range(self.config.sessions):
            try:
                raw = self._token.open(rw=True)
            except p11e.PKCS11Error as e:
                raise TokenUnavailable(
                    f"cannot open a token session ({type(e).__name__})"
                ) from None
            self._pool.put(Session(raw, self.watchdog, self._epoch))

    def _relogin(self, why: str) -> None:
        """Logs in again once (the login was lost: a logout after maintenance); a second loss
        soon after, or a login that fails otherwise, is treated as a device fault."""
        if not self._login_lock.acquire(blocking=False):
            return  # another thread is logging in
        try:
            if time.monotonic() - self._relogged_at < 30:
                self._fault(f"{why}, again soon after logging in again")
                return
            log.warning("token login lost (%s); logging in again", why)
            self._relogged_at = time.monotonic()
            try:
                self._login = self._log_in()
            except p11e.UserAlreadyLoggedIn:
                pass
            except PIN_REFUSED as e:
                self._refuse_pin(pin_refused(e, self.config.pin.describe()))
            except (p11e.PKCS11Error, ConfigError) as e:
                self._fault(f"logging in again failed ({type(e).__name__})")
        finally:
            self._login_lock.release()

    def _set_state(self, state: TokenState, why: str) -> None:
        with self._cond:
            if self._state is state or self._state in (TokenState.PIN_REFUSED, TokenState.CLOSED):
                return
            self._state, self._reason = state, why
            self._cond.notify_all()
            listeners = list(self._listeners)
        for listener in listeners:
            listener(state, why)

    def _refuse_pin(self, err: PinRefused) -> None:
        self._pin_refused = err
        log.error("token refused the PIN: %s; not serving any more (exit 77)", err)
        self._set_state(TokenState.PIN_REFUSED, str(err))

    def _fault(self, why: str) -> None:
        """Puts a usable token in RECOVERING and starts the one recovery thread."""
        with self._cond:
            if self._state is not TokenState.USABLE:
                return
            log.warning(
                "token %s fault: %s; re-initialising the module (calls get UNAVAILABLE "
                "until it recovers)",
                self.config.describe_token(),
                why,
            )
            self._recovery = threading.Thread(
                target=self._recover, args=(why,), name="token-recovery", daemon=True
            )
        self._set_state(TokenState.RECOVERING, why)
        self._recovery.start()

    def _recover(self, why: str) -> None:
        started = time.monotonic()
        delay = RECOVERY_BACKOFF[0]
        attempt = 0
        if started - self._recovered_at < FLAPPING_SECONDS:
            # A fault again soon after a recovery: a fault that persists though the module
            # re-initialises fine. Keep backing off instead of re-initialising in a loop.
            self._flap_delay = min(max(self._flap_delay * 2, delay), RECOVERY_BACKOFF[1])
            if self._stop.wait(self._flap_delay):
                return
        else:
            self._flap_delay = 0.0
        while not self._stop.is_set():
            attempt += 1
            try:
                self._rebuild()
            except PinRefused as e:
                self._refuse_pin(e)
                return
            except (p11e.PKCS11Error, ServerError) as e:
                log.warning(
                    "token recovery attempt %d failed (%s); next in %gs",
                    attempt,
                    _describe(e),
                    delay,
                )
            else:
                log.warning(
                    "token %s recovered after %.2fs (%d attempt%s; fault: %s)",
                    self.config.describe_token(),
                    time.monotonic() - started,
                    attempt,
                    "" if attempt == 1 else "s",
                    why,
                )
                self._recovered_at = time.monotonic()
                self._set_state(TokenState.USABLE, "recovered")
                return
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, RECOVERY_BACKOFF[1])

    def _rebuild(self) -> None:
        """Waits for the calls inside the module, closes every session, finalizes and
        initialises the module, finds the token, logs in, opens the pool. Raises PinRefused,
        TokenUnavailable or the PKCS#11 error of the step that failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._in_use == 0, DRAIN_SECONDS):
                raise TokenUnavailable(f"{self._in_use} calls are still inside the token")
            self._epoch += 1
        lock = self._serial_lock or contextlib.nullcontext()
        with lock:
            while True:
                try:
                    old = self._pool.get_nowait()
                except queue.Empty:
                    break
                with contextlib.suppress(Exception):
                    old.raw.close()
            with contextlib.suppress(Exception):
                self._login.close()
            with contextlib.suppress(p11e.PKCS11Error):
                self._lib.finalize()
            self._lib.initialize()
            self._token = self._find_token()
            try:
                self._login = self._log_in()
            except PIN_REFUSED as e:
                raise pin_refused(e, self.config.pin.describe()) from None
            self._fill_pool()

    def close(self) -> None:
        """Stops a recovery and the call watchdog, closes the pool's sessions, then the login
        session."""
        self._stop.set()
        self._set_state(TokenState.CLOSED, "closed")
        self.watchdog.close()
        recovery = self._recovery
        if recovery is not None and recovery is not threading.current_thread():
            recovery.join(timeout=DRAIN_SECONDS + 5)
        while True:
            try:
                s = self._pool.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(Exception):
                s.raw.close()
        with contextlib.suppress(Exception):
            self._login.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, p11e.NoSuchToken):
        return "no such token"
    if isinstance(e, ServerError):
        return str(e)
    return type(e).__name__
