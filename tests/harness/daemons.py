"""hsmsignd for tests: one-shot commands and serving daemons, always on a port they were given
(127.0.0.1:0 unless a test names another; the daemon reports the chosen one in --ready-file),
and a guard that proves no test daemon or client uses the default port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import leaks
from tests.harness.paths import HSMSIGN, HSMSIGND
from tests.harness.tokens import TEST_LISTEN

#: The daemon's and the client's default address (server.listen, hsmsign --server): what a
#: developer's `make run` holds while the tests run in another shell.
DEFAULT_PORT = 50051


def _with_listen(args: tuple[str, ...]) -> tuple[str, ...]:
    """``args`` for a serving command with --listen added when it has none: an hsmsignd that
    serves in a test must never fall back to the config's default port."""
    if not args:
        return ("serve", "--listen", TEST_LISTEN)
    if args[0] == "serve" and "--listen" not in args:
        return ("serve", "--listen", TEST_LISTEN, *args[1:])
    return args


def hsmsignd(
    config: Path, *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Runs ``hsmsignd --config CONFIG ARGS`` to its end (no args: serve, on a free port).

    Raises AssertionError if ``check`` and it exits non-zero."""
    args = _with_listen(args)
    r = subprocess.run(
        [HSMSIGND, "--config", str(config), *args], capture_output=True, text=True, timeout=timeout
    )
    leaks.capture(f"hsmsignd {' '.join(args)}", r.stdout + r.stderr)
    if check and r.returncode != 0:
        raise AssertionError(f"hsmsignd {' '.join(args)} failed ({r.returncode}): {r.stderr}")
    return r


@dataclass
class Daemon:
    """A running hsmsignd subprocess."""

    config: Path
    proc: subprocess.Popen[bytes]
    address: str
    log_path: Path
    tmp: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        """The log as it stands. Lines reach it from a writer thread (server/logsink.py), so a
        line logged before an answer may land after it: to look for one, use ``wait_log``."""
        return self.log_path.read_text(errors="replace")

    def wait_log(self, *needles: str, timeout: float = 15.0) -> str:
        """The log once every one of ``needles`` is in it. Raises AssertionError with the
        log's tail if one is still missing after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.log()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                tail = "\n".join(text.splitlines()[-20:])
                raise AssertionError(f"not in the log after {timeout}s: {missing}\n{tail}")
            time.sleep(0.05)

    def hsmsign(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Runs the client CLI against this daemon. Raises AssertionError if ``check`` and it
        exits non-zero."""
        r = subprocess.run(
            [HSMSIGN, "--server", self.address, *args],
            capture_output=True,
            input=input,
            timeout=120,
            cwd=self.tmp,
        )
        leaks.capture(f"hsmsign {' '.join(args)}", r.stderr)
        if check and r.returncode != 0:
            raise AssertionError(
                f"hsmsign {' '.join(args)} failed ({r.returncode}): "
                f"{r.stderr.decode(errors='replace')}"
            )
        return r

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_daemon(
    config: Path,
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 30,
    command: Sequence[str] = (HSMSIGND,),
) -> Daemon:
    """Starts ``hsmsignd serve`` on 127.0.0.1:0 (a later ``--listen`` in ``args`` wins) and
    waits for its ready file. ``command``: what runs hsmsignd (the fault-injection launcher,
    tests/harness/faults.py). Raises AssertionError if it exits or is not ready in time."""
    tmp.mkdir(parents=True, exist_ok=True)
    ready = tmp / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = tmp / "hsmsignd.log"
    leaks.watch(log_path)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                *command,
                "--config",
                str(config),
                "serve",
                "--listen",
                TEST_LISTEN,
                "--ready-file",
                str(ready),
                *args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"hsmsignd exited {proc.returncode}: {log_path.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"hsmsignd not ready in {timeout}s: {log_path.read_text()}")
        time.sleep(0.05)
    address = str(json.loads(ready.read_text())["address"])
    return Daemon(config, proc, address, log_path, tmp, env or {})


@contextlib.contextmanager
def running_daemon(
    config: Path, tmp: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Daemon]:
    """``start_daemon`` for a ``with`` block: the daemon is stopped when the block ends."""
    d = start_daemon(config, tmp, *args, env=env)
    try:
        yield d
    finally:
        d.stop()


class DefaultPortGuard:
    """Holds 127.0.0.1:50051 (listening, no SO_REUSEPORT) while the tests run, so a test
    daemon that would serve on the default port fails to start, and records every connection
    a test client makes to it. If another program already holds the port (a developer's
    ``make run``), that program plays the same part and the guard holds nothing."""

    def __init__(self, port: int = DEFAULT_PORT) -> None:
        self.port = port
        self.connections = 0
        self.held = False
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> DefaultPortGuard:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            return self
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock, self.held = sock, True
        self._thread = threading.Thread(target=self._accept, name="port-guard", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        sock = self._sock
        while sock is not None and self._sock is not None:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def __exit__(self, *exc: object) -> None:
        sock, self._sock = self._sock, None
        if self._thread is not None:
            self._thread.join(2)
        if sock is not None:
            sock.close()
