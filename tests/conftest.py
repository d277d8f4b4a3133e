"""Fixtures only: real SoftHSM2 tokens, real hsmsignd subprocesses, real gRPC channels.

The machinery lives in tests/harness/ (shared with bench/); its names are re-exported here
for the test modules that import them from tests.conftest. Each test session makes its own
SoftHSM2 token directory (never the developer's dev token); daemons listen on a free loopback
port that they report through --ready-file, and a guard holds the default port 127.0.0.1:50051
for the whole run so that a test that would use it fails.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsmsign.client import Client
from tests.harness import (
    BIN,
    DEFAULT_PORT,
    HSMSIGN,
    HSMSIGND,
    PROXY_MODULE,
    REPO,
    SOFTHSM_MODULE,
    Daemon,
    DefaultPortGuard,
    TokenDir,
    hsmsignd,
    leaks,
    make_token,
    start_daemon,
    write_config,
)
from tests.harness.capgo_cli import CapgoCli, cli_entry, make_project

__all__ = [
    "BIN",
    "HSMSIGN",
    "HSMSIGND",
    "PROXY_MODULE",
    "REPO",
    "SOFTHSM_MODULE",
    "CapgoCli",
    "Daemon",
    "TokenDir",
    "hsmsignd",
    "make_project",
    "make_token",
    "start_daemon",
    "write_config",
]


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the run (set up first, so torn down last, after every daemon has
    stopped): every daemon log, audit file and captured command output of the run is searched
    for the run's token PINs and the secrets the tests remembered (tests/harness/leaks.py);
    one found fails the run."""
    yield
    found = leaks.check_run(tmp_path_factory.getbasetemp())
    if found:
        shown = "\n  ".join(str(leak) for leak in found[:20])
        pytest.fail(f"{len(found)} secret(s) in the run's logs or audit files:\n  {shown}")


@pytest.fixture(scope="session", autouse=True)
def default_port_guard() -> Iterator[DefaultPortGuard]:
    """Holds 127.0.0.1:50051 for the whole run: a test daemon that binds it cannot start, and
    a test client that connects to it fails the run here (the suite itself proves that no
    test depends on the default port being free, or on what listens there)."""
    with DefaultPortGuard() as guard:
        yield guard
    if guard.connections:
        pytest.fail(
            f"{guard.connections} connection(s) to 127.0.0.1:{DEFAULT_PORT} during the tests: "
            "a test client used the default address; give it the test daemon's address"
        )


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
def client(daemon: Daemon) -> Iterator[Client]:
    c = Client(daemon.address)
    yield c
    c.close()


@pytest.fixture(scope="session")
def capgo_cli() -> CapgoCli:
    """The pinned Capgo CLI (installed with npm on first use). Fails when node or npm is
    missing: `make test` installs them."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        pytest.fail(
            "node/npm not installed: run `make test`, which installs them for the Capgo "
            "CLI peer tests"
        )
    return CapgoCli(cli_entry(), node)
