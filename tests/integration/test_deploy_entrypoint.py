"""The container's entry point and health check (deploy/entrypoint.sh, deploy/healthcheck.py)
with the real daemon: a refused PIN (exit 77) leaves a marker, and the next start (what a
Kubernetes container restart does) exits 77 again without presenting the PIN; SIGTERM to the
entry point drains the daemon and its status comes back; the health check says SERVING while
the daemon serves and fails once it is gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import BIN, REPO, TokenDir, make_token, write_config
from tests.harness.tokens import TEST_LISTEN

ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"


def _env(state: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HSMSIGND_STATE_DIR": str(state)}


@pytest.fixture(scope="module")
def own_token(tmp_path_factory: pytest.TempPathFactory) -> TokenDir:
    """A token of its own: this module presents wrong PINs to it."""
    return make_token(tmp_path_factory.mktemp("entrypoint-token"), "hsmsign-entry")


def test_a_refused_pin_is_not_presented_again_after_a_restart(
    own_token: TokenDir, tmp_path: Path
) -> None:
    pin = tmp_path / "pin"
    pin.write_text("wrong-pin-4711")
    pin.chmod(0o600)
    cfg = write_config(tmp_path / "c.toml", own_token, pin_line=f'pin_file = "{pin}"')
    state = tmp_path / "state"
    args = [str(ENTRYPOINT), "--config", str(cfg), "serve", "--listen", TEST_LISTEN]
    first = subprocess.run(args, env=_env(state), capture_output=True, text=True, timeout=120)
    assert first.returncode == 77, first.stderr
    assert "refused the PIN" in first.stderr
    assert (state / "pin-refused").exists()
    # The container restarts: the marker stops it before hsmsignd could present the PIN.
    again = subprocess.run(args, env=_env(state), capture_output=True, text=True, timeout=120)
    assert again.returncode == 77
    # One line, the entry point's: hsmsignd did not run.
    assert again.stderr.count("\n") == 1 and "not trying it again" in again.stderr
    daemon_line = next(line for line in first.stderr.splitlines() if "refused the PIN" in line)
    assert daemon_line not in again.stderr
    assert "wrong-pin-4711" not in first.stderr + again.stderr


def test_sigterm_drains_the_daemon_and_health_follows_it(
    own_token: TokenDir, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.toml", own_token, extra="[server]\nprocesses = 1")
    ready = tmp_path / "ready.json"
    log = tmp_path / "log"
    args = [str(ENTRYPOINT), "--config", str(cfg), "serve", "--listen", TEST_LISTEN]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*args, "--ready-file", str(ready)],
            env=_env(tmp_path / "state"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        daemon_pid = int(info["pid"])
        assert daemon_pid != proc.pid  # the shell started it, and stays to pass signals on

        def health() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, str(HEALTHCHECK), info["address"], "hsmsign.v1.Signer"],
                capture_output=True,
                text=True,
                timeout=60,
            )

        serving = health()
        assert serving.returncode == 0, serving.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        assert not Path(f"/proc/{daemon_pid}").exists()
        gone = health()
        assert gone.returncode == 1
        assert "UNAVAILABLE" in gone.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
