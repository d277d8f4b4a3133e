"""The test harness: real SoftHSM2 tokens, real hsmsignd subprocesses on ports they were given,
TLS certificates made by the test, and the pinned Capgo CLI. Shared by tests/ and bench/
(neither imports a pytest conftest); the programs tests run in child processes live in
``scripts/`` as real files, so ruff and mypy see them."""

from tests.harness.daemons import (
    DEFAULT_PORT,
    Daemon,
    DefaultPortGuard,
    hsmsignd,
    start_daemon,
)
from tests.harness.paths import (
    BIN,
    HSMSIGN,
    HSMSIGND,
    PROXY_MODULE,
    REPO,
    SCRIPTS,
    SOFTHSM_MODULE,
    script,
)
from tests.harness.tokens import P11Object, TokenDir, make_token, parse_objects, write_config

__all__ = [
    "BIN",
    "DEFAULT_PORT",
    "HSMSIGN",
    "HSMSIGND",
    "PROXY_MODULE",
    "REPO",
    "SCRIPTS",
    "SOFTHSM_MODULE",
    "Daemon",
    "DefaultPortGuard",
    "P11Object",
    "TokenDir",
    "hsmsignd",
    "make_token",
    "parse_objects",
    "script",
    "start_daemon",
    "write_config",
]
