"""The PKCS#11 token: the loaded module, the login session and the session pool.

One ``Token`` per process owns the loaded module, one logged-in session kept for the life of
the process (login is per application: docs/design-facts.md fact 2), and a bounded pool of
further sessions that calls borrow. Whether the pool's sessions run in parallel depends on the
module: python-pkcs11 calls ``C_Initialize(NULL)``, which tells a module that it will not be
called from several threads, and SoftHSM2 then disables its locking (fact 1). Through p11-kit's
proxy the real module is initialised with OS locking, so ``threading = "parallel"``; any other
module runs ``"serialized"`` (one lock around every call) unless the operator says it is
thread-safe (docs/adr/0001-pkcs11-threading.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e

from server.config import TokenConfig
from server.errors import (
    Busy,
    PinRefused,
    ServerError,
    StartupError,
    TokenNotFound,
    TokenUnavailable,
)
from server.pkcs11.errors import SESSION_LOST, classify
from server.pkcs11.pool import SessionPool
from server.pkcs11.session import Session
from server.pkcs11.watchdog import CallOverdue, CallWatchdog

log = logging.getLogger(__name__)


class Token:
    """The loaded module, the login session and the session pool. Thread-safe."""

    def __init__(self, config: TokenConfig) -> None:
        """Loads the module, finds the token, logs in once and opens the pool's sessions.

        Raises StartupError (module missing or unloadable, PIN refused or locked, several
        tokens match), TokenNotFound, ConfigError (PIN source unreadable) or TokenUnavailable.
        """
        self.config = config
        self._serial_lock: threading.Lock | None = (
            threading.Lock() if config.threading == "serialized" else None
        )
        self._pool: SessionPool[Session] = SessionPool()
        self._closed = False
        #: Times every call on the pool's sessions (server/pkcs11/watchdog.py).
        self.watchdog = CallWatchdog(
            config.call_timeout_seconds, config.keygen_timeout_seconds, config.stuck_exit_seconds
        )
        for k, v in config.environment.items():
            os.environ[k] = v
        if not config.module.exists():
            raise StartupError(f"PKCS#11 module not found: {config.module} (token.module)")
        try:
            self._lib = pkcs11.lib(str(config.module))
        except p11e.PKCS11Error as e:
            raise StartupError(f"cannot load PKCS#11 module {config.module}: {e}") from None
        try:
            self._token = self._lib.get_token(token_label=config.label, token_serial=config.serial)
        except p11e.NoSuchToken:
            raise TokenNotFound(
                f"no token with {config.describe_token()} in module {config.module}"
            ) from None
        except p11e.MultipleTokensReturned:
            raise StartupError(
                f"several tokens have {config.describe_token()}; select by serial instead"
            ) from None
        pin = config.pin.read()
        try:
            # Kept open for the life of the process: closing it would log every session out.
            self._login = self._token.open(user_pin=pin, rw=True)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
            raise PinRefused(
                f"the token refused the PIN from {config.pin.describe()} (not retried, "
                "to avoid locking the token)"
            ) from None
        except p11e.PinLocked:
            raise PinRefused("the token's user PIN is locked; unlock it with the SO PIN") from None
        except p11e.PinExpired:
            raise PinRefused(
                "the token's user PIN has expired; set a new one with the token's tools"
            ) from None
        except p11e.PKCS11Error as e:
            raise StartupError(f"cannot log in to the token: {type(e).__name__}") from None
        finally:
            del pin
        for _ in range(config.sessions):
            self._pool.put(Session(self._open_session(), self.watchdog))
        log.info(
            "token %s: %d sessions, threading=%s, module %s",
            config.describe_token(),
            config.sessions,
            config.threading,
            config.module,
        )

    @property
    def label(self) -> str:
        return str(self._token.label)

    def _open_session(self) -> Any:
        try:
            return self._token.open(rw=True)
        except p11e.PKCS11Error as e:
            raise TokenUnavailable(f"cannot open a token session ({type(e).__name__})") from None

    @contextlib.contextmanager
    def session(self, what: str) -> Iterator[Session]:
        """Borrows a session for one operation; classifies PKCS#11 errors raised inside.

        Raises Busy when no session frees up in time, TokenUnavailable when the token fails,
        and the classified error (``server.pkcs11.errors.classify``) for any other refusal.
        """
        if self._closed:
            raise TokenUnavailable("the daemon is shutting down")
        try:
            s = self._pool.get(timeout=self.config.session_wait_seconds)
        except queue.Empty:
            raise Busy(
                f"all {self.config.sessions} token sessions stayed busy for "
                f"{self.config.session_wait_seconds:g}s; retry later"
            ) from None
        lock = self._serial_lock or contextlib.nullcontext()
        s.purpose = what
        try:
            with lock:
                yield s
        except CallOverdue:
            s = self._replace(s)  # never lent again: the module may still be using it
            raise
        except ServerError:
            raise
        except SESSION_LOST as e:
            log.warning("token session lost during %s (%s); replacing it", what, type(e).__name__)
            s = self._replace(s)
            raise TokenUnavailable(f"the token session was lost during {what}; retry") from None
        except p11e.PKCS11Error as e:
            raise classify(e, what) from None
        finally:
            self._pool.put(s)

    def _replace(self, s: Session) -> Session:
        with contextlib.suppress(Exception):
            s.raw.close()
        try:
            return Session(self._open_session(), self.watchdog)
        except TokenUnavailable:
            return s

    def close(self) -> None:
        """Closes the pool's sessions, then the login session."""
        self._closed = True
        self.watchdog.close()
        while True:
            try:
                s = self._pool.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(Exception):
                s.raw.close()
        with contextlib.suppress(Exception):
            self._login.close()
