"""The token layer: key attributes as OpenSC sees them, and thread safety
(docs/design-facts.md, fact 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROXY_MODULE, SOFTHSM_MODULE, TokenDir, write_config
from tests.harness import script


def test_private_key_is_sensitive_and_never_extractable(token: TokenDir) -> None:
    key = token.object("Private Key", "hsmsign:demo:v1")
    assert key.detail.split()[0] == "RSA"
    assert key.access == {"sensitive", "always sensitive", "never extractable", "local"}
    assert key.usage == {"sign"}


def test_private_exponent_cannot_be_read(token: TokenDir, tmp_path: Path) -> None:
    """Asking the token for the private key's secret attributes is refused (CKA_SENSITIVE)."""
    r = subprocess.run(
        [
            sys.executable,
            script("read_private_exponent.py"),
            SOFTHSM_MODULE,
            token.label,
            str(token.pin_file),
            "hsmsign:demo:v1",
        ],
        env=token.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "LEAKED" not in r.stdout
    assert r.stdout.count("refused AttributeSensitive") >= 2


@pytest.mark.parametrize(
    ("module", "mode"),
    [
        (PROXY_MODULE, "parallel"),  # p11-kit initialises SoftHSM2 with OS locking
        (SOFTHSM_MODULE, "serialized"),  # loaded directly: the default is one lock for all calls
    ],
)
def test_many_threads_sign_safely(token: TokenDir, tmp_path: Path, module: str, mode: str) -> None:
    """8 threads x 150 signatures on 4 sessions; every signature verifies, no crash.

    Run in a subprocess: without the right threading mode SoftHSM2 crashes the process
    (double free, segfault) within seconds, which would take pytest down with it.
    """
    cfg = write_config(tmp_path / "c.toml", token, module=module)
    r = subprocess.run(
        [sys.executable, script("threaded_signing.py"), str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split()[:3] == [mode, "1200", "0"]


def test_threading_default_follows_module(token: TokenDir, tmp_path: Path) -> None:
    from server import config as cfgmod

    direct = cfgmod.load(write_config(tmp_path / "a.toml", token, module=SOFTHSM_MODULE))
    proxy = cfgmod.load(write_config(tmp_path / "b.toml", token, module=PROXY_MODULE))
    assert direct.token.threading == "serialized"
    assert proxy.token.threading == "parallel"
