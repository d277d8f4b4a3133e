"""What the daemon's processes leave for others to read: no core dump (the token runs inside
the daemon with SoftHSM2, so a core holds private exponents), and no PIN in
/proc/PID/environ of any of its processes."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hsmsign.client import Client
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.conftest import HSMSIGND, TokenDir, make_token, write_config

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    address: str
    supervisor: int
    workers: list[int]
    log: Path

    def pids(self) -> list[int]:
        return [self.supervisor, *self.workers]


def _raise_core_limit() -> None:
    # As a shell's `ulimit -c unlimited` would, for the daemon and its children.
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def _start(
    config: Path, cwd: Path, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> Running:
    """hsmsignd in ``cwd`` (where a core file would land) with core dumps allowed by its
    parent, as an operator's shell might leave them."""
    cwd.mkdir(parents=True, exist_ok=True)
    ready = cwd / "ready.json"
    log = cwd / "hsmsignd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *prefix,
                HSMSIGND,
                "--config",
                str(config),
                "serve",
                *("--listen", "127.0.0.1:0"),
                *("--ready-file", str(ready)),
            ],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_raise_core_limit,
        )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"hsmsignd did not start: {log.read_text()}")
        time.sleep(0.05)
    info = json.loads(ready.read_text())
    return Running(proc, info["address"], info["pid"], info.get("workers", []), log)


def _stop(r: Running) -> None:
    if r.proc.poll() is None:
        r.proc.send_signal(signal.SIGTERM)
        try:
            r.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def _wait_gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        # A zombie child of the supervisor still has a /proc entry: that counts as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return
        except OSError:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still running")
        time.sleep(0.05)


def _core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError("no core line in /proc/PID/limits")


@pytest.fixture()
def cores_land_in_cwd() -> Iterator[None]:
    pattern = CORE_PATTERN.read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write cores to the process's cwd")
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("the hard core-size limit is 0 here: nothing to switch off")
    yield


@pytest.mark.parametrize("processes", [1, 2])
def test_sigabrt_leaves_no_core(
    token: TokenDir, tmp_path: Path, cores_land_in_cwd: None, processes: int
) -> None:
    cfg = write_config(tmp_path / "c.toml", token, extra=f"[server]\nprocesses = {processes}\n")
    cwd = tmp_path / "cwd"
    r = _start(cfg, cwd)
    try:
        assert len(r.pids()) == (1 if processes == 1 else 3)
        for pid in r.pids():
            assert _core_limit(pid) == "0 0", f"pid {pid}: RLIMIT_CORE not 0"
        # Even with the limit raised again from outside (prlimit with CAP_SYS_RESOURCE), a
        # process that is not dumpable writes no core: kill a serving process, then the
        # supervisor. Without that capability nobody can raise the hard limit 0 again.
        for pid in [*r.workers, r.supervisor]:
            with contextlib.suppress(PermissionError):
                resource.prlimit(pid, resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
            os.kill(pid, signal.SIGABRT)
            _wait_gone(pid)
        r.proc.wait(timeout=30)
        assert r.proc.returncode == -signal.SIGABRT
        time.sleep(0.5)  # a core is written before the parent sees the exit; be generous
        assert sorted(p.name for p in cwd.iterdir() if p.name.startswith("core")) == []
    finally:
        _stop(r)
        for pid in r.workers:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("processes", [1, 2])
def test_pin_env_is_not_left_in_any_process_environment(
    token: TokenDir, tmp_path: Path, processes: int
) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        token,
        pin_line='pin_env = "TEST_HSM_PIN"',
        extra=f"[server]\nprocesses = {processes}\n",
    )
    r = _start(cfg, tmp_path / "cwd", env={"TEST_HSM_PIN": token.pin})
    try:
        pin = token.pin.encode()
        for pid in r.pids():
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            left = pin in environ or b"TEST_HSM_PIN=" in environ
            assert not left, f"pid {pid}: the PIN is in /proc/{pid}/environ"
        with Client(r.address) as c:
            assert c.public_key("demo").key.name == "demo"
        if r.workers:
            # A serving process that dies is started again, and logs in without the variable.
            old = r.workers[0]
            os.kill(old, signal.SIGKILL)
            ready = json.loads((tmp_path / "cwd" / "ready.json").read_text())
            deadline = time.monotonic() + 30
            while (
                old in ready["workers"]
                or "ready on" not in r.log.read_text().split("starting it again")[-1]
            ):
                assert time.monotonic() < deadline, r.log.read_text()
                time.sleep(0.1)
                ready = json.loads((tmp_path / "cwd" / "ready.json").read_text())
            for pid in ready["workers"]:
                left = pin in Path(f"/proc/{pid}/environ").read_bytes()
                assert not left, f"restarted pid {pid}: the PIN is in its environ"
            for _ in range(4):  # reach both processes
                with Client(r.address) as c:
                    assert c.public_key("demo").key.name == "demo"
        assert token.pin not in r.log.read_text()
    finally:
        _stop(r)


NOBODY = 65534


def _nobody_can_run_hsmsignd() -> bool:
    """Whether user nobody can start this checkout's hsmsignd (a checkout or venv inside a
    private directory, such as a mktemp -d or a home directory, is out of its reach)."""
    if os.geteuid() != 0:
        return False
    r = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            "test",
            "-r",
            HSMSIGND,
        ],
        check=False,
        timeout=30,
    )
    return r.returncode == 0


@pytest.mark.skipif(
    not _nobody_can_run_hsmsignd(),
    reason="needs root, and a checkout user nobody can read (runs the daemon as nobody); "
    "tests/unit/test_hardening_state.py checks the same state in-process",
)
def test_no_process_is_dumpable(tmp_path: Path) -> None:
    """A process that is not dumpable has its /proc/PID files owned by root: other processes
    of its own user can neither ptrace it nor read its memory. Observable only when the
    daemon runs as a user other than root, so this one runs as nobody, with a token of its
    own outside pytest's root-only directories. One process: the venv's interpreter may sit
    under root's home, which nobody cannot enter to start serving processes (the core test
    above covers those, as root)."""
    home = Path(tempfile.mkdtemp(prefix="hsmsign-nobody-"))
    try:
        t = make_token(home / "token")
        cfg = write_config(home / "c.toml", t, extra="[server]\nprocesses = 1\n")
        (home / "cwd").mkdir()
        for p in [home, *home.rglob("*")]:
            os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
        as_nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        r = _start(cfg, home / "cwd", prefix=as_nobody)
        try:
            for pid in r.pids():
                owner = Path(f"/proc/{pid}/environ").stat().st_uid
                assert owner == 0, f"pid {pid} is dumpable (/proc/{pid} owned by uid {owner})"
            with Client(r.address) as c:
                assert list(c.call(lambda: c.admin.ListKeys(pb.ListKeysRequest())).keys) == []
        finally:
            _stop(r)
    finally:
        shutil.rmtree(home, ignore_errors=True)
