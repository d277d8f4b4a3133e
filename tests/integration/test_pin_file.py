"""The PIN file is read only when nobody but the daemon's user could have written it or
pointed its name elsewhere; anything else stops the start with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import HSMSIGND, TokenDir, hsmsignd, write_config


def _pin_in(directory: Path, token: TokenDir, *, dir_mode: int = 0o700) -> Path:
    directory.mkdir(mode=0o700)
    pin = directory / "user.pin"
    pin.write_text(token.pin)
    pin.chmod(0o600)
    directory.chmod(dir_mode)
    return pin


def _world_writable_dir(tmp: Path, token: TokenDir) -> Path:
    return _pin_in(tmp / "open", token, dir_mode=0o777)


def _sticky_dir(tmp: Path, token: TokenDir) -> Path:
    return _pin_in(tmp / "sticky", token, dir_mode=0o1777)


def _group_writable_dir(tmp: Path, token: TokenDir) -> Path:
    return _pin_in(tmp / "group", token, dir_mode=0o770)


def _group_writable_file(tmp: Path, token: TokenDir) -> Path:
    pin = _pin_in(tmp / "ok", token)
    pin.chmod(0o620)
    return pin


def _symlink_in_open_dir(tmp: Path, token: TokenDir) -> Path:
    target = _pin_in(tmp / "ok", token)
    (tmp / "open").mkdir()
    (tmp / "open").chmod(0o777)
    link = tmp / "open" / "user.pin"
    link.symlink_to(target)
    return link


def _symlink_into_open_dir(tmp: Path, token: TokenDir) -> Path:
    target = _pin_in(tmp / "open", token, dir_mode=0o777)
    (tmp / "ok").mkdir(mode=0o700)
    link = tmp / "ok" / "user.pin"
    link.symlink_to(target)
    return link


def _fifo(tmp: Path, token: TokenDir) -> Path:
    (tmp / "ok").mkdir(mode=0o700)
    fifo = tmp / "ok" / "user.pin"
    os.mkfifo(fifo, 0o600)
    return fifo


def _owned_by_nobody(tmp: Path, token: TokenDir) -> Path:
    pin = _pin_in(tmp / "ok", token)
    os.chown(pin, 65534, 65534)
    return pin


def _dir_owned_by_nobody(tmp: Path, token: TokenDir) -> Path:
    pin = _pin_in(tmp / "ok", token)
    os.chown(pin.parent, 65534, 65534)
    return pin


CASES: dict[str, tuple[Callable[[Path, TokenDir], Path], str]] = {
    "world-writable-dir": (_world_writable_dir, "writable by other users (mode 777)"),
    "sticky-dir": (_sticky_dir, "writable by other users (mode 1777)"),
    "group-writable-dir": (_group_writable_dir, "writable by other users (mode 770)"),
    "group-writable-file": (_group_writable_file, "is writable by other users (mode 620)"),
    "symlink-in-open-dir": (_symlink_in_open_dir, "writable by other users (mode 777)"),
    "symlink-into-open-dir": (_symlink_into_open_dir, "writable by other users (mode 777)"),
    "fifo": (_fifo, "is a FIFO; give a regular file"),
    "owned-by-another-user": (_owned_by_nobody, "is owned by uid 65534, not by uid"),
    "dir-owned-by-another-user": (_dir_owned_by_nobody, "is owned by uid 65534, who could"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pin_file_others_could_touch_is_refused(token: TokenDir, tmp_path: Path, case: str) -> None:
    make, words = CASES[case]
    if "owned" in case and os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    pin = make(tmp_path, token)
    cfg = write_config(tmp_path / "c.toml", token, pin_line=f'pin_file = "{pin}"')
    for args in (["serve", "--listen", "127.0.0.1:0"], ["keys", "list"]):
        try:
            r = subprocess.run(
                [HSMSIGND, "--config", str(cfg), *args],
                capture_output=True,
                text=True,
                timeout=20,  # a FIFO hung the start here for ever
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"hsmsignd {args[0]} did not stop: it hung or served with {pin}")
        assert r.returncode == 2, r.stderr
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("hsmsignd: config error: "), r.stderr
        assert f"token.pin_file: {pin}" in lines[0] and words in lines[0], lines[0]
        assert token.pin not in r.stderr


def test_safe_symlink_is_followed(token: TokenDir, tmp_path: Path) -> None:
    """A symlink in a private directory to a file in a private directory is fine (the layout
    a configuration manager makes)."""
    target = _pin_in(tmp_path / "store", token)
    (tmp_path / "etc").mkdir(mode=0o700)
    link = tmp_path / "etc" / "user.pin"
    link.symlink_to(target)
    cfg = write_config(tmp_path / "c.toml", token, pin_line=f'pin_file = "{link}"')
    assert "demo" in hsmsignd(cfg, "keys", "list").stdout


def test_test_and_dev_tokens_make_pin_files_that_pass(token: TokenDir) -> None:
    """softhsm/dev-token.sh (behind make_token and `make run`) writes the PIN 0600 in a
    directory only its user can write."""
    st, dir_st = token.pin_file.stat(), token.pin_file.parent.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    assert dir_st.st_mode & 0o022 == 0 and dir_st.st_uid == os.geteuid()
