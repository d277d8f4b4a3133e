"""What the daemon tells the world once it serves: the listening line and the ready file.

Both start-up paths (one serving process, or a supervisor of several) end here, so a daemon
announces itself the same way whatever its process model.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from server import metrics
from server.config import Config
from server.keyring.model import Key


def keys_summary(keys: Sequence[Key]) -> str:
    """The primary versions, as the listening line names them."""
    summary = ", ".join(
        f"{k.name} v{k.primary.version} sha256:{k.primary.fingerprint}" for k in keys if k.primary
    )
    return summary or "no keys yet (create one with 'hsmsignd keys create NAME')"


def listening_line(cfg: Config, address: str, token_label: str, keys: str) -> str:
    """The INFO line that says the daemon is up: where, how, which token and keys."""
    tls = cfg.server.tls
    how = (
        "plaintext"
        if tls is None
        else "TLS" + (" with client certificates" if tls.client_ca else "")
    )
    processes = cfg.server.processes
    procs = f", {processes} serving processes" if processes > 1 else ""
    return f"listening on {address} ({how}{procs}) token {token_label!r}; keys: {keys}"


def write_ready_file(path: Path, address: str, serving_pids: Sequence[int] | None = None) -> None:
    """Writes ``{"address", "pid"}`` (and, with several serving processes, their pids under
    ``workers``; with metrics served, their address under ``metrics``) as JSON to ``path``,
    atomically: a reader sees no file or a whole one.

    Raises OSError when the file cannot be written.
    """
    content: dict[str, object] = {"address": address, "pid": os.getpid()}
    if metrics.served_address is not None:
        content["metrics"] = metrics.served_address
    if serving_pids is not None:
        content["workers"] = list(serving_pids)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ready-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
