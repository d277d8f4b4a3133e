"""The serving process's health: the one place that turns its conditions into the statuses of
the standard health service.

A serving process is SERVING for the empty service name and ``hsmsign.v1.Signer`` when it
has started and every condition holds: the token is usable (not recovering from a fault,
not refused its PIN), no token call is past its time limit (``server.pkcs11.watchdog``), the
key ring can be read, and the audit trail can be written (with ``[audit]``).
``hsmsign.v1.KeyAdmin`` is SERVING under the same conditions on a daemon that administers
keys (``server.key_admin``), NOT_SERVING otherwise. Conditions change from the threads that
notice them (the token's recovery, the call watchdog, the key ring's refresh, the audit
writer); each change logs one line.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from grpc_health.v1 import health, health_pb2

log = logging.getLogger(__name__)

#: The conditions, in the order a NOT_SERVING line names them.
CONDITIONS: Final = ("token", "calls", "keyring", "audit")

SERVING: Final = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Composes the conditions into the health servicer's statuses. Thread-safe."""

    def __init__(self, servicer: health.HealthServicer, key_admin: bool) -> None:
        self.servicer = servicer
        self._key_admin = key_admin
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}
        self._started = False
        self._apply()

    def set(self, condition: str, ok: bool, why: str = "") -> None:
        """Records whether ``condition`` (one of CONDITIONS) holds, and why not."""
        if condition not in CONDITIONS:
            raise ValueError(f"unknown health condition {condition!r}")
        with self._lock:
            was = self._failing.get(condition)
            if ok:
                if was is None:
                    return
                del self._failing[condition]
            else:
                if was is not None:
                    return
                self._failing[condition] = why or "failing"
            self._apply()
            serving = self._started and not self._failing
        if self._started:
            if serving:
                log.warning("health: SERVING again (%s recovered)", condition)
            elif ok:
                log.warning("health: %s recovered; still NOT_SERVING", condition)
            else:
                log.warning("health: NOT_SERVING (%s: %s)", condition, why)

    def start(self) -> None:
        """The server has started: SERVING from now on while every condition holds."""
        with self._lock:
            self._started = True
            self._apply()

    @property
    def serving(self) -> bool:
        with self._lock:
            return self._started and not self._failing

    def _apply(self) -> None:
        status = SERVING if self._started and not self._failing else NOT_SERVING
        for name in ("", "hsmsign.v1.Signer"):
            self.servicer.set(name, status)
        self.servicer.set("hsmsign.v1.KeyAdmin", status if self._key_admin else NOT_SERVING)
