"""Several serving processes behind one port: the daemon's process model
(docs/adr/0003-serving-processes.md).

With ``server.processes`` above 1 the process hsmsignd starts as becomes a small supervisor:

1. it checks the token once (``server.serve.run_daemon``, the same start-up order as a lone
   daemon: one login attempt, so a wrong PIN costs the token one retry, not one per process;
   the key ring, the ``[keys.NAME]`` tables and the implicit-rejection secret);
2. then it reserves the port (a socket bound with SO_REUSEPORT, never listening), so a port in
   use fails here with one clear line and port 0 picks one port for every process;
3. it starts the serving processes (``python -m server.main ... serve --serving-process
   SPEC``), each with its own PKCS#11 login, session pool and threads, all listening on the
   port with SO_REUSEPORT so the kernel spreads connections over them;
4. it forwards SIGTERM/SIGINT (each process drains its calls) and SIGHUP (each reloads its
   config, server/reload.py), restarts a process that dies, replaces one whose heartbeat
   stops (server/heartbeat.py: stopped, frozen), and gives up (exit 1) if they keep dying;
5. a process that exits 77 (PinRefused: the token refused the PIN) is never restarted: the
   supervisor stops the others and exits 77 itself, so nothing tries that PIN again.

The processes share one counter (a memfd) that each bumps after changing the key ring; the
others re-read the ring before their next request, so a change is visible to every later call
whichever process it reaches. A lifeline pipe ends every serving process if the supervisor is
killed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from server import pinsource
from server.config import Config
from server.errors import (
    EXIT_PIN_REFUSED,
    EXIT_TOKEN_HUNG,
    ConfigError,
    PinRefused,
    StartupError,
    cannot_listen,
)
from server.heartbeat import Heartbeats, start_beating
from server.ready import write_ready_file

log = logging.getLogger("hsmsignd")

#: A serving process that dies this many times within RESTART_WINDOW seconds stops the daemon.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Seconds a serving process may take from start to serving.
START_TIMEOUT = 60.0

#: What runs a serving process (before its arguments). Only a test launcher changes it, in
#: its own process before the supervisor starts (tests/harness/faulty_hsmsignd.py, so that
#: its fault injection reaches every serving process); no config or environment does.
SERVING_COMMAND: list[str] = [sys.executable, "-m", "server.main"]


class SharedCounter:
    """Eight bytes of memory shared by the daemon's processes (a memfd inherited by each), and
    a lock over the token's objects for them.

    Readers only compare values, so a read needs no lock; ``bump`` takes a POSIX record lock
    on byte 0 (per process) and a thread lock (per thread), so increments from different
    processes are never lost. ``objects_exclusive`` holds a record lock on byte 8: SoftHSM2
    answers CKR_FUNCTION_FAILED or CKR_GENERAL_ERROR when one process reads the token's
    objects while another creates or destroys some, so the serving processes take turns for
    key-ring reads and writes, key generation and destruction (signing is not affected).
    """

    _thread_lock = threading.Lock()

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, 8)
        self._objects = threading.RLock()
        self._objects_depth = 0
        self._objects_owner = 0

    @contextlib.contextmanager
    def objects_exclusive(self) -> Iterator[None]:
        with self._objects:  # one thread of this process; re-entrant for nested use
            if self._objects_depth == 0:
                fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 8)  # one process of this daemon
            self._objects_depth += 1
            self._objects_owner = threading.get_ident()
            try:
                yield
            finally:
                self._objects_depth -= 1
                if self._objects_depth == 0:
                    fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 8)

    @contextlib.contextmanager
    def objects_released(self) -> Iterator[None]:
        """For the thread in ``objects_exclusive``, while it waits: the other serving
        processes may take their turn meanwhile; taken again after."""
        held = self._objects_depth > 0 and self._objects_owner == threading.get_ident()
        if held:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 8)
        try:
            yield
        finally:
            if held:
                fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 8)

    @classmethod
    def create(cls) -> SharedCounter:
        fd = os.memfd_create("hsmsignd-ring-changes", 0)
        os.ftruncate(fd, 8)
        return cls(fd)

    def read(self) -> int:
        value: int = struct.unpack_from("<Q", self._map)[0]
        return value

    def bump(self) -> int:
        with self._thread_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
            try:
                value = self.read() + 1
                struct.pack_into("<Q", self._map, 0, value)
                return value
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)


@dataclass(frozen=True)
class ServingProcessSpec:
    """What a serving process gets from its supervisor
    (``--serving-process INDEX/COUNT:C:R:L:H``)."""

    index: int
    count: int
    counter_fd: int
    ready_fd: int
    lifeline_fd: int
    heartbeat_fd: int

    def encode(self) -> str:
        fds = (self.counter_fd, self.ready_fd, self.lifeline_fd, self.heartbeat_fd)
        return f"{self.index}/{self.count}:" + ":".join(map(str, fds))

    @classmethod
    def decode(cls, text: str) -> ServingProcessSpec:
        """Raises ConfigError (a usage error) for text the supervisor did not write."""
        try:
            position, counter, ready, lifeline, heartbeat = text.split(":")
            index, count = position.split("/")
            return cls(
                int(index), int(count), int(counter), int(ready), int(lifeline), int(heartbeat)
            )
        except ValueError:
            raise ConfigError(
                f"--serving-process {text!r} is internal to hsmsignd (INDEX/COUNT:FD:FD:FD:FD)"
            ) from None

    @property
    def name(self) -> str:
        return f"serving process {self.index}/{self.count}"

    def announce_ready(self) -> None:
        os.write(self.ready_fd, f"ready {self.index} {os.getpid()}\n".encode())

    def watch_lifeline(self, on_orphaned: threading.Event) -> None:
        """Sets ``on_orphaned`` when the supervisor is gone (the pipe's write end closes)."""

        def wait() -> None:
            while True:
                try:
                    if not os.read(self.lifeline_fd, 64):
                        break
                except InterruptedError:
                    continue
                except OSError:
                    break
            if not on_orphaned.is_set():
                log.warning("%s: the supervisor is gone; draining and exiting", self.name)
                on_orphaned.set()

        threading.Thread(target=wait, name="lifeline", daemon=True).start()

    def start_heartbeat(self, interval: float, check: Callable[[], bool]) -> None:
        """Beats into this process's slot every ``interval`` seconds while ``check()``
        passes (server/heartbeat.py)."""
        start_beating(Heartbeats(self.heartbeat_fd, self.count), self.index, interval, check)


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """Binds ``listen`` without SO_REUSEPORT (fails if another socket listens there), then
    keeps a SO_REUSEPORT socket bound to the chosen port, never listening, for the daemon's
    life. Both set SO_REUSEADDR, so the TIME_WAIT connections a stopped daemon leaves on the
    port do not block a restart (Linux still refuses a port with a listener)."""
    host, _, port = listen.rpartition(":")
    try:
        infos = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot listen on {listen}: {e}") from None
    family, _type, _proto, _name, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            raise cannot_listen(listen) from None
        chosen = probe.getsockname()[1]
    hold = socket.socket(family, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        hold.bind((address[0], chosen, *address[2:]))
    except OSError:
        hold.close()
        raise StartupError(f"cannot listen on {listen} (taken while starting)") from None
    return hold, f"{host}:{chosen}"


class _ServingProcess:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid_ready: int | None = None
        #: time.monotonic_ns() of its start and of its ready line.
        self.started_ns = 0
        self.ready_ns = 0
        #: The supervisor has killed it (no heartbeat, or not ready in time).
        self.killed = False


class Supervisor:
    def __init__(
        self, cfg: Config, listen: str, ready_file: Path | None, line: Callable[[str], str]
    ) -> None:
        self.cfg = cfg
        self.listen = listen
        self.ready_file = ready_file
        self.line = line
        self.count = cfg.server.processes
        self.processes = [_ServingProcess(i + 1) for i in range(self.count)]
        self.stop = threading.Event()
        self.restarts: list[float] = []

    # -- starting -------------------------------------------------------------------------

    def _spawn(self, w: _ServingProcess) -> None:
        spec = ServingProcessSpec(
            w.index, self.count, self.counter.fd, self.ready_w, self.lifeline_r, self.beats.fd
        )
        cmd = [
            *SERVING_COMMAND,
            "--config",
            str(self.cfg.path),
            "serve",
            "--listen",
            self.address,
            "--serving-process",
            spec.encode(),
        ]
        w.pid_ready = None
        w.killed = False
        w.started_ns = time.monotonic_ns()
        self.beats.clear(w.index)
        # A PIN from the environment reaches the process through a pipe (server/pinsource.py).
        with pinsource.handed_to_child(self.cfg.token.pin.env) as (pin_env, pin_fds):
            w.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                pass_fds=(
                    self.counter.fd,
                    self.ready_w,
                    self.lifeline_r,
                    self.beats.fd,
                    *pin_fds,
                ),
                env={**os.environ, **pin_env},
            )

    def _read_ready(self, timeout: float) -> None:
        """Reads 'ready INDEX PID' lines until every serving process is ready or ``timeout``."""
        deadline = time.monotonic() + timeout
        while any(w.pid_ready is None for w in self.processes):
            for w in self.processes:
                if w.pid_ready is None and w.proc is not None and w.proc.poll() is not None:
                    self._refuse_pin_retry(w, w.proc.returncode)
                    raise StartupError(
                        f"serving process {w.index}/{self.count} exited with code "
                        f"{w.proc.returncode} while starting (its error is above)"
                    )
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupError(
                    f"serving processes not ready within {timeout:g}s (the log above says why)"
                )
            ready, _, _ = select.select([self.ready_r], [], [], min(left, 0.2))
            if ready:
                self._take_ready_lines()

    def _take_ready_lines(self) -> None:
        data = os.read(self.ready_r, 4096).decode(errors="replace")
        for line in data.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "ready":
                index, pid = int(parts[1]), int(parts[2])
                w = self.processes[index - 1]
                if w.proc is not None and w.proc.pid == pid:
                    w.pid_ready = pid
                    w.ready_ns = time.monotonic_ns()

    def _write_ready_file(self) -> None:
        if self.ready_file is not None:
            pids = [w.proc.pid for w in self.processes if w.proc is not None]
            write_ready_file(self.ready_file, self.address, pids)

    # -- running --------------------------------------------------------------------------

    def run(self) -> int:
        """Reserves the port, starts the serving processes and watches them until SIGTERM or
        SIGINT. Raises StartupError when the port is taken or a process cannot start."""
        self.hold, self.address = reserve_port(self.listen)
        self.counter = SharedCounter.create()
        self.beats = Heartbeats.create(self.count)
        self.ready_r, self.ready_w = os.pipe()
        self.lifeline_r, lifeline_w = os.pipe()
        os.set_inheritable(lifeline_w, False)

        def on_signal(signum: int, _frame: object) -> None:
            if not self.stop.is_set():
                log.info(
                    "%s received: draining in-flight calls in %d serving processes (up to %gs)",
                    signal.Signals(signum).name,
                    self.count,
                    self.cfg.server.grace_seconds,
                )
            self.stop.set()

        def on_reload(_signum: int, _frame: object) -> None:
            # Each serving process re-reads the config itself (server/reload.py).
            log.info("SIGHUP received: reloading the config in %d serving processes", self.count)
            for w in self.processes:
                if w.proc is not None and w.proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.send_signal(signal.SIGHUP)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_reload)
        try:
            for w in self.processes:
                self._spawn(w)
            self._read_ready(START_TIMEOUT)
            log.info("%s", self.line(self.address))
            self._write_ready_file()
            return self._watch()
        finally:
            self._stop_all()
            os.close(lifeline_w)
            self.hold.close()

    def _watch(self) -> int:
        while not self.stop.wait(0.2):
            if select.select([self.ready_r], [], [], 0)[0]:
                self._take_ready_lines()
            for w in self.processes:
                code = w.proc.poll() if w.proc is not None else None
                if w.proc is None or self.stop.is_set():
                    continue
                if code is None:
                    self._check_heartbeat(w)
                    continue
                self._refuse_pin_retry(w, code)
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"code {code}"
                if code == EXIT_TOKEN_HUNG:
                    how += " (a token call hung)"
                now = time.monotonic()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
                if len(self.restarts) > MAX_RESTARTS:
                    log.error(
                        "serving process %d/%d exited with %s; %d exits within %gs: stopping",
                        w.index,
                        self.count,
                        how,
                        len(self.restarts),
                        RESTART_WINDOW,
                    )
                    return 1
                log.error(
                    "serving process %d/%d (pid %d) exited with %s; starting it again",
                    w.index,
                    self.count,
                    w.proc.pid,
                    how,
                )
                self._spawn(w)
                self._write_ready_file()
        return 0

    def _refuse_pin_retry(self, w: _ServingProcess, code: int) -> None:
        """Raises PinRefused (exit 77, after ``run`` stops the other processes) when a
        serving process exited 77: another login with that PIN could lock the token's user."""
        if code == EXIT_PIN_REFUSED:
            raise PinRefused(
                f"serving process {w.index}/{self.count} exited with code 77: the token refused "
                "the PIN; not restarting it, stopping the other serving processes (a refused PIN "
                "is never tried again; fix the PIN, then start hsmsignd)"
            )

    def _check_heartbeat(self, w: _ServingProcess) -> None:
        """Kills a running process that stopped beating (or never became ready); the next
        look sees it exit and starts a new one."""
        if w.proc is None or w.killed:
            return
        now = time.monotonic_ns()
        limit = self.cfg.server.heartbeat_timeout_seconds
        if w.pid_ready != w.proc.pid:
            if now - w.started_ns <= START_TIMEOUT * 1e9:
                return
            why = f"not ready within {START_TIMEOUT:g}s of its start"
        else:
            silent = (now - max(self.beats.last(w.index), w.ready_ns)) / 1e9
            if silent <= limit:
                return
            why = (
                f"no heartbeat for {silent:.1f}s (server.heartbeat_timeout_seconds = {limit:g}; "
                "stopped, frozen, or its token watchdog stalled)"
            )
        log.error(
            "serving process %d/%d (pid %d) stopped answering: %s; killing it",
            w.index,
            self.count,
            w.proc.pid,
            why,
        )
        with contextlib.suppress(ProcessLookupError):
            w.proc.kill()
        w.killed = True

    def _stop_all(self) -> None:
        running = [w.proc for w in self.processes if w.proc is not None and w.proc.poll() is None]
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.cfg.server.grace_seconds + 10
        for p in running:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("serving process pid %d did not stop; killing it", p.pid)
                p.kill()
                p.wait()
        if running:
            log.info("stopped")


def run(cfg: Config, listen: str, ready_file: Path | None, line: Callable[[str], str]) -> int:
    """Supervises ``server.processes`` serving processes on ``listen``; ``line`` makes the
    listening line for the address they serve on. Returns the exit code."""
    return Supervisor(cfg, listen, ready_file, line).run()
