"""Starting a serving process's audit chain: the audit key, the chain writer, and health.

``server.serve`` calls ``start`` before the gRPC server starts (no call is ever served
unaudited) and ``stop`` at exit; whether the trail can be written goes to ``server.health``.
"""

from __future__ import annotations

from collections.abc import Callable

from server.audit import signing, trail
from server.audit.writer import Checkpointer
from server.config import Config
from server.pkcs11.token import Token


def start(cfg: Config, token: Token, process_index: int, on_health: Callable[[bool], None]) -> None:
    """Opens chain ``process_index`` under ``[audit] path`` (nothing without it);
    ``on_health(writable)`` hears whether the trail can be written (``server.health``).
    Raises StartupError when the chain is held by another process or the audit key is
    unusable."""
    directory = cfg.audit.directory
    if directory is None:
        return

    def checkpointer() -> Checkpointer:
        return signing.audit_key(token, cfg.audit.key_label, directory)[0]

    trail.start(cfg.audit, str(process_index), checkpointer, on_health)


def stop() -> None:
    trail.stop()
