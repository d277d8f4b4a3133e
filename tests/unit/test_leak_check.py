"""The run-wide secrets search (tests/harness/leaks.py, run by tests/conftest.py at the end of
every session) catches a planted PIN or session key in a log or an audit file, in any of the
forms it searches, names where without printing the secret, and passes a clean run."""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import leaks


@pytest.fixture()
def tmp_path() -> Iterator[Path]:
    """Outside the run's own directory, and removed at once: the planted secrets must not
    fail the real search at the end of this session."""
    with tempfile.TemporaryDirectory(prefix="hsmsign-leak-check-") as d:
        yield Path(d)


def _run_dir(tmp_path: Path) -> tuple[Path, str]:
    """A run directory as the harness leaves it: a token with its PIN files, a daemon log
    and an audit trail, none of which holds a secret yet."""
    token = tmp_path / "token0"
    token.mkdir()
    pin = os.urandom(12).hex()
    (token / "user.pin").write_text(pin)
    (token / "so.pin").write_text(os.urandom(12).hex())
    daemon = tmp_path / "daemon0"
    (daemon / "audit").mkdir(parents=True)
    (daemon / "hsmsignd.log").write_text("2026-12-02 04:00:00 INFO hsmsign: serving\n")
    (daemon / "audit" / "audit-1.jsonl").write_text('{"op":"SignDigest"}\n')
    return tmp_path, pin


def test_a_clean_run_passes(tmp_path: Path) -> None:
    root, _pin = _run_dir(tmp_path)
    os.mkfifo(root / "daemon0" / "user.pin")  # as tests/integration/test_pin_file.py leaves
    assert leaks.check_run(root) == []  # and returns: the FIFO is not read


def test_a_pin_in_a_daemon_log_is_caught_and_not_printed(tmp_path: Path) -> None:
    root, pin = _run_dir(tmp_path)
    log = root / "daemon0" / "hsmsignd.log"
    log.write_text(log.read_text() + f"ERROR login failed with PIN {pin}\n")
    found = leaks.check_run(root)
    assert [(f.where, f.form) for f in found] == [(f"{log}:2", "as it is")]
    assert "user.pin" in found[0].what and pin not in str(found[0])


@pytest.mark.parametrize("form", ["hex", "base64"])
def test_a_remembered_session_key_in_an_audit_file_is_caught(tmp_path: Path, form: str) -> None:
    root, _pin = _run_dir(tmp_path)
    session_key = os.urandom(16)
    leaks.remember(session_key, "a planted session key")
    written = session_key.hex() if form == "hex" else base64.b64encode(session_key).decode()
    trail = root / "daemon0" / "audit" / "audit-1.jsonl"
    trail.write_text(trail.read_text() + f'{{"session_key":"{written}"}}\n')
    found = leaks.check_run(root)
    assert [(f.where, f.what, f.form) for f in found] == [
        (f"{trail}:2", "a planted session key", form)
    ]


def test_captured_command_output_is_searched(tmp_path: Path) -> None:
    root, pin = _run_dir(tmp_path)
    leaks.capture("hsmsignd keys list (planted)", f"error: bad PIN {pin}\n")
    try:
        found = leaks.check_run(root)
    finally:
        leaks.forget_captured("hsmsignd keys list (planted)")
    assert [f.where for f in found] == ["hsmsignd keys list (planted):1"]
