"""Start-up checks the token before the port, whatever the number of serving processes.

A busy port must not hide a wrong PIN or a wrong module: the operator fixes the token first,
and the daemon reports the first problem it finds in one fixed order (token, then port).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TokenDir, hsmsignd, make_token, start_daemon, write_config


@pytest.fixture()
def held_port() -> Iterator[str]:
    """A loopback port another socket is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def own_token(tmp_path_factory: pytest.TempPathFactory) -> TokenDir:
    """A token of its own: wrong PINs here touch no other test's token."""
    return make_token(tmp_path_factory.mktemp("order-token"), "hsmsign-order")


def _wrong_pin(tmp_path: Path, token: TokenDir, processes: int) -> Path:
    pin = tmp_path / "pin"
    pin.write_text("wrong-pin-4711")
    pin.chmod(0o600)
    return write_config(
        tmp_path / "c.toml",
        token,
        pin_line=f'pin_file = "{pin}"',
        extra=f"[server]\nprocesses = {processes}\n",
    )


@pytest.mark.parametrize("processes", [1, 2])
def test_a_wrong_pin_is_reported_even_when_the_port_is_busy(
    own_token: TokenDir, tmp_path: Path, held_port: str, processes: int
) -> None:
    cfg = _wrong_pin(tmp_path, own_token, processes)
    r = hsmsignd(cfg, "serve", "--listen", held_port, check=False, timeout=60)
    assert r.returncode == 77, r.stderr
    assert "refused the PIN" in r.stderr
    assert "cannot listen" not in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_a_wrong_module_is_reported_even_when_the_port_is_busy(
    own_token: TokenDir, tmp_path: Path, held_port: str, processes: int
) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        own_token,
        module=str(tmp_path / "no-such-module.so"),
        extra=f"[server]\nprocesses = {processes}\n",
    )
    r = hsmsignd(cfg, "serve", "--listen", held_port, check=False, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "PKCS#11 module not found" in r.stderr
    assert "cannot listen" not in r.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_a_busy_port_is_reported_once_the_token_is_fine(
    own_token: TokenDir, tmp_path: Path, held_port: str, processes: int
) -> None:
    cfg = write_config(tmp_path / "c.toml", own_token, extra=f"[server]\nprocesses = {processes}\n")
    r = hsmsignd(cfg, "serve", "--listen", held_port, check=False, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"cannot listen on {held_port} (in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_serving_processes_all_come_up(own_token: TokenDir, tmp_path: Path) -> None:
    """Serving processes that log in to a SoftHSM2 token at the same moment can miss it ("no
    token with label", or GeneralError at login): they take turns. Without that, about one
    start in six of a 4-process daemon failed; this starts one a few times."""
    cfg = write_config(tmp_path / "c.toml", own_token, extra="[server]\nprocesses = 4\n")
    for i in range(6):
        d = start_daemon(cfg, tmp_path / f"d{i}", timeout=60)
        assert d.stop() == 0, d.log()
