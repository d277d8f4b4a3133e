"""KeyAdmin on its own unix socket (``server.admin_listen``), against a real daemon.

With an admin socket configured, key administration is served only there, to the identity
``admin-socket`` (who may connect is the socket file's mode and owner), and the network
listener answers only the Signer: a caller on the network, even one the policy grants admin
rights, cannot create, rotate or disable keys; the admin socket signs nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.conftest import Daemon, TokenDir, hsmsignd, make_token, start_daemon, write_config
from tests.harness.calls import sign_status
from tests.harness.paths import HSMSIGN

POLICY = """
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local"]
keys = ["*"]
operations = ["*"]
[[policy.grant]]
identities = ["admin-socket"]
keys = ["*"]
operations = ["list", "get", "rotate", "create", "set_primary"]
"""


@pytest.fixture(scope="module")
def admin_token(tmp_path_factory: pytest.TempPathFactory) -> TokenDir:
    """A token of its own: these tests rotate its key, which the shared token must not see
    (other tests sign with that token's first version)."""
    t = make_token(tmp_path_factory.mktemp("admin-socket-token"), "hsmsign-admin-socket")
    hsmsignd(write_config(t.path / "hsmsignd.toml", t), "keys", "create", "demo")
    return t


def _config(tmp_path: Path, token: TokenDir, socket: Path, processes: int = 1) -> Path:
    return write_config(
        tmp_path / "c.toml",
        token,
        policy=POLICY,
        extra=f'[server]\nprocesses = {processes}\nadmin_listen = "unix:{socket}"\n',
    )


def _list_keys(target: str) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(target) as ch:
        try:
            pb_grpc.KeyAdminStub(ch).ListKeys(pb.ListKeysRequest(), timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def _cli(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HSMSIGN, "--server", target, *args], capture_output=True, text=True, timeout=120
    )


def _start(tmp_path: Path, token: TokenDir, processes: int = 1) -> tuple[Daemon, Path]:
    socket = tmp_path / "run" / "admin.sock"
    socket.parent.mkdir()
    return start_daemon(_config(tmp_path, token, socket, processes), tmp_path / "d"), socket


def test_key_admin_only_on_the_admin_socket_and_signing_only_on_the_network(
    admin_token: TokenDir, tmp_path: Path
) -> None:
    d, socket = _start(tmp_path, admin_token)
    try:
        # The network: signing as before; KeyAdmin refused even for a caller granted "*".
        with grpc.insecure_channel(d.address) as ch:
            assert sign_status(ch) == (grpc.StatusCode.OK, "")
        code, details = _list_keys(d.address)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "admin socket" in details and "server.admin_listen" in details
        # The socket: the admin-socket identity's grants; the hsmsign CLI reaches it too.
        assert _list_keys(f"unix:{socket}") == (grpc.StatusCode.OK, "")
        r = _cli(f"unix:{socket}", "keys", "rotate", "demo")
        assert r.returncode == 0, r.stderr
        r = _cli(f"unix:{socket}", "keys", "disable", "demo", "1")
        assert r.returncode != 0 and "admin-socket" in r.stderr, r.stderr  # not granted
        with grpc.insecure_channel(f"unix:{socket}") as ch:
            code, details = sign_status(ch)
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
        assert "serves only KeyAdmin" in details
        # Only the daemon's user and group may connect.
        assert stat.S_IMODE(socket.stat().st_mode) == 0o660
        assert "Traceback" not in d.log()
    finally:
        d.stop()


def test_the_admin_socket_survives_a_serving_process_restart(
    admin_token: TokenDir, tmp_path: Path
) -> None:
    # With several serving processes one of them serves the socket (a unix socket has no
    # SO_REUSEPORT); when it is replaced, the new one serves it again.
    d, socket = _start(tmp_path, admin_token, processes=2)
    try:
        assert _list_keys(f"unix:{socket}") == (grpc.StatusCode.OK, "")
        first = _socket_server_pid(d)
        os.kill(first, 9)
        deadline = 60.0
        t0 = time.monotonic()
        while True:
            code, details = _list_keys(f"unix:{socket}")
            if code == grpc.StatusCode.OK:
                break
            assert time.monotonic() - t0 < deadline, (code, details, d.log())
            time.sleep(0.5)
        assert _socket_server_pid(d) != first
    finally:
        d.stop()


def _socket_server_pid(d: Daemon) -> int:
    """The serving process that logged it serves the admin socket, last."""
    lines = [ln for ln in d.log().splitlines() if "admin socket" in ln and "pid" in ln]
    assert lines, d.log()
    return int(lines[-1].rpartition("pid ")[2].split(")")[0])


def test_an_admin_socket_that_is_not_a_unix_socket_is_refused(
    token: TokenDir, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        token,
        policy=POLICY,
        extra='[server]\nadmin_listen = "127.0.0.1:7777"\n',
    )
    r = hsmsignd(cfg, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "admin_listen" in r.stderr and "unix:" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("listen", ["unix:relative.sock", "unix:"])
def test_the_admin_socket_path_must_be_absolute(
    token: TokenDir, tmp_path: Path, listen: str
) -> None:
    cfg = write_config(
        tmp_path / "c.toml", token, policy=POLICY, extra=f'[server]\nadmin_listen = "{listen}"\n'
    )
    r = hsmsignd(cfg, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert r.returncode == 2 and "absolute" in r.stderr, r.stderr
