"""Starting a serving process's audit chain: the audit key, the chain writer, and health.

``server.serve`` calls ``start`` before the gRPC server starts (no call is ever served
unaudited), ``apply_health`` after it has set the services' health, and ``stop`` at exit.
"""

from __future__ import annotations

import threading

from grpc_health.v1 import health, health_pb2

from server.audit import signing, trail
from server.audit.writer import Checkpointer
from server.config import Config
from server.pkcs11.token import Token

_state = {"ok": True}
_health_lock = threading.Lock()
_targets: list[tuple[health.HealthServicer, tuple[str, ...]]] = []


def start(
    cfg: Config, token: Token, process_index: int, health_servicer: health.HealthServicer
) -> None:
    """Opens chain ``process_index`` under ``[audit] path`` (nothing without it). Raises
    StartupError when the chain is held by another process or the audit key is unusable."""
    directory = cfg.audit.directory
    if directory is None:
        return
    names = ("", "hsmsign.v1.Signer") + (("hsmsign.v1.KeyAdmin",) if cfg.server.key_admin else ())
    _targets.append((health_servicer, names))

    def checkpointer() -> Checkpointer:
        return signing.audit_key(token, cfg.audit.key_label, directory)[0]

    trail.start(cfg.audit, str(process_index), checkpointer, _on_health)


def _on_health(ok: bool) -> None:
    with _health_lock:
        _state["ok"] = ok
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ok
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for servicer, names in _targets:
            for name in names:
                servicer.set(name, status)


def apply_health() -> None:
    """Sets health again from the trail's state (after the daemon marked itself SERVING)."""
    if _targets and not _state["ok"]:
        _on_health(False)


def stop() -> None:
    trail.stop()
