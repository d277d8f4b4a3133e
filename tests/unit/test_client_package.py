"""The client package stays thin: a build agent installs it without python-pkcs11."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import script

REPO = Path(__file__).resolve().parent.parent.parent


def test_client_modules_do_not_import_pkcs11_or_the_daemon() -> None:
    modules = sorted(
        f"hsmsign.{p.stem}" for p in (REPO / "hsmsign").glob("*.py") if p.stem != "__init__"
    )
    r = subprocess.run(
        [sys.executable, script("import_modules.py"), "pkcs11,server", *modules],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(modules) > 10


def test_pyproject_keeps_pkcs11_in_the_server_extra() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any("pkcs11" in d for d in project["dependencies"])
    assert any(d.startswith("python-pkcs11") for d in project["optional-dependencies"]["server"])
