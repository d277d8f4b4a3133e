"""A test-only launcher: hsmsignd whose token signing calls hang while a file says so.

``python -m tests.harness.hanging_token HANG_FILE -- HSMSIGND-ARGS`` wraps python-pkcs11's
C_Sign entry point (``SignMixin._sign``, used for every signature and HMAC) with a sleep: while
HANG_FILE exists, each call first sleeps the number of seconds the file holds (the sleep
releases the GIL, as python-pkcs11 does around its C calls, so it behaves like a call blocked
inside a network HSM's client library), then signs on the real SoftHSM2 token. Then it runs
``server.main`` in this process. Nothing in the daemon knows of this: only a test that starts
this module gets it, never a config. Serving processes started by a supervisor are plain
``server.main`` processes, so use it with ``server.processes = 1``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness.daemons import Daemon
from tests.harness.paths import REPO
from tests.harness.tokens import TEST_LISTEN


def _install(hang_file: Path) -> None:
    import pkcs11._pkcs11

    # The .pyi stub does not list the mixins the compiled module defines.
    native: Any = pkcs11._pkcs11
    real_sign = native.SignMixin._sign

    def sign(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            seconds = float(hang_file.read_text() or "0")
        except (OSError, ValueError):
            seconds = 0.0
        if seconds > 0:
            time.sleep(seconds)
        return real_sign(self, *args, **kwargs)

    native.SignMixin._sign = sign


def hang(hang_file: Path, seconds: float) -> None:
    """Every signing call that starts from now on first sleeps ``seconds``."""
    hang_file.write_text(f"{seconds}")


def start(config: Path, tmp: Path, hang_file: Path, timeout: float = 60) -> Daemon:
    """Starts this launcher serving ``config`` on 127.0.0.1:0 and waits for its ready file.
    Raises AssertionError if it exits or is not ready in time."""
    tmp.mkdir(parents=True, exist_ok=True)
    ready = tmp / "ready.json"
    log_path = tmp / "hsmsignd.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.harness.hanging_token",
                str(hang_file),
                "--",
                "--config",
                str(config),
                "serve",
                "--listen",
                TEST_LISTEN,
                "--ready-file",
                str(ready),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"hanging hsmsignd did not start: {log_path.read_text()}")
        time.sleep(0.05)
    address = str(json.loads(ready.read_text())["address"])
    return Daemon(config, proc, address, log_path, tmp)


def main(argv: list[str]) -> int:
    hang_file, separator, *rest = argv
    if separator != "--":
        raise SystemExit("usage: python -m tests.harness.hanging_token HANG_FILE -- ARGS")
    _install(Path(hang_file))
    from server import main as server_main

    return server_main.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
