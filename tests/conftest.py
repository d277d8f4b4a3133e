"""Shared fixtures: real SoftHSM2 tokens, real hsmsignd subprocesses, real gRPC channels.

Each test session makes its own SoftHSM2 token directory (never the developer's dev token),
and daemons listen on a free loopback port that they report through --ready-file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from server.config import MULTIARCH
from tests.capgo_cli import capgo_cli  # noqa: F401  (the pinned Capgo CLI, for every test)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HSMSIGND = str(BIN / "hsmsignd")
HSMSIGN = str(BIN / "hsmsign")
PROXY_MODULE = f"/usr/lib/{MULTIARCH}/p11-kit-proxy.so"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


#: The caller on this host may do everything, as in hsm_config/dev.toml: what test daemons
#: run with unless a test passes its own ``policy``.
LOCAL_GRANTS_ALL = """
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local"]
keys = ["*"]
operations = ["*"]
"""


@dataclass
class TokenDir:
    """An isolated SoftHSM2 token: its softhsm2.conf, label and PIN file."""

    path: Path
    label: str

    @property
    def conf(self) -> Path:
        return self.path / "softhsm2.conf"

    @property
    def pin_file(self) -> Path:
        return self.path / "user.pin"

    @property
    def pin(self) -> str:
        return self.pin_file.read_text()

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def pkcs11_tool(self, *args: str) -> str:
        """Runs OpenSC's pkcs11-tool on this token, logged in; returns stdout."""
        r = subprocess.run(
            [
                "pkcs11-tool",
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                self.label,
                "--login",
                "--pin",
                self.pin,
                *args,
            ],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return r.stdout


def make_token(path: Path, label: str = "hsmsign-test") -> TokenDir:
    subprocess.run(
        [str(REPO / "softhsm" / "dev-token.sh"), str(path), label],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return TokenDir(path, label)


def write_config(
    path: Path,
    token: TokenDir,
    *,
    module: str = PROXY_MODULE,
    extra_token: str = "",
    extra: str = "",
    pin_line: str | None = None,
    policy: str | None = None,
) -> Path:
    pin = pin_line if pin_line is not None else f'pin_file = "{token.pin_file}"'
    path.write_text(f"""
log_level = "INFO"
{extra}
[token]
module = "{module}"
label = "{token.label}"
{pin}
sessions = 4
{extra_token}
[token.environment]
SOFTHSM2_CONF = "{token.conf}"
{LOCAL_GRANTS_ALL if policy is None else policy}""")
    return path


def hsmsignd(
    config: Path, *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [HSMSIGND, "--config", str(config), *args], capture_output=True, text=True, timeout=timeout
    )
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
        return self.log_path.read_text(errors="replace")

    def hsmsign(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run(
            [HSMSIGN, "--server", self.address, *args],
            capture_output=True,
            input=input,
            timeout=120,
            cwd=self.tmp,
        )
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
    config: Path, tmp: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> Daemon:
    tmp.mkdir(parents=True, exist_ok=True)
    ready = tmp / "ready.json"
    ready.unlink(missing_ok=True)
    log_path = tmp / "hsmsignd.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            HSMSIGND,
            "--config",
            str(config),
            "serve",
            "--listen",
            "127.0.0.1:0",
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
            raise AssertionError(f"hsmsignd not ready in {timeout}s: {log_path.read_text()}")
        time.sleep(0.05)
    address = json.loads(ready.read_text())["address"]
    return Daemon(config, proc, address, log_path, tmp, env or {})


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory) -> TokenDir:
    """One SoftHSM2 token for the session, with a sign key 'demo' (RSA-2048) and
    'big' (RSA-3072)."""
    t = make_token(tmp_path_factory.mktemp("token"))
    config = write_config(t.path / "hsmsignd.toml", t)
    hsmsignd(config, "keys", "create", "demo")
    hsmsignd(config, "keys", "create", "big", "--algorithm", "rsa-3072")
    return t


@pytest.fixture(scope="session")
def config(token: TokenDir) -> Path:
    return token.path / "hsmsignd.toml"


@pytest.fixture(scope="session")
def daemon(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = start_daemon(config, tmp_path_factory.mktemp("daemon"))
    yield d
    d.stop()


@pytest.fixture()
def client(daemon: Daemon) -> Iterator[object]:
    from hsmsign.client import Client

    c = Client(daemon.address)
    yield c
    c.close()
