"""The hsmsign CLI speaks plaintext only to this machine unless told --insecure, and warns
whenever a private key would cross a plaintext connection."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import HSMSIGN, Daemon


def _hsmsign(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HSMSIGN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "server", ["10.20.30.40:50051", "hsm.example.com:443", "[2001:db8::1]:50051"]
)
def test_plaintext_to_another_machine_is_refused(server: str) -> None:
    for r in (
        _hsmsign("--server", server, "pubkey", "demo"),
        _hsmsign("pubkey", "demo", env={"HSMSIGN_SERVER": server}),
    ):
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("hsmsign: error: "), r.stderr
        assert f"refusing plaintext to {server}" in r.stderr and "--insecure" in r.stderr
        assert "--tls-ca" in r.stderr


@pytest.mark.parametrize(
    "server",
    ["127.0.0.1:1", "127.8.9.10:1", "localhost:1", "[::1]:1", "0.0.0.0:1", "unix:/nonexistent/s"],
)
def test_plaintext_to_this_machine_is_allowed(server: str) -> None:
    r = _hsmsign("--server", server, "pubkey", "demo")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr, r.stderr  # tried, nobody there


def _own_address() -> str:
    """A non-loopback address of this machine (a connection to port 1 is refused at once), or
    an unroutable one where there is none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: picks a route and source address, sends nothing
            address: str = s.getsockname()[0]
        except OSError:
            return "192.0.2.1"
    return address if not address.startswith("127.") else "192.0.2.1"


def test_insecure_flag_allows_plaintext_elsewhere() -> None:
    server = f"{_own_address()}:1"
    assert _hsmsign("--server", server, "pubkey", "demo").returncode == 2
    r = _hsmsign("--insecure", "--server", server, "pubkey", "demo")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr, r.stderr


def test_plaintext_key_import_is_warned_about(daemon: Daemon, tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    pem = tmp_path / "k.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.chmod(0o600)
    # An invalid name: the daemon refuses after the warning, so the shared token is unchanged.
    r = daemon.hsmsign("keys", "import", "--name", "no spaces allowed", str(pem), check=False)
    stderr = r.stderr.decode()
    assert r.returncode != 0
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("hsmsign: warning: ")]
    assert len(warnings) == 1, stderr
    assert "plaintext" in warnings[0] and "private key" in warnings[0]
