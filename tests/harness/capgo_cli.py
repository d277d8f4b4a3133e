"""Locate (and install if missing) the pinned Capgo CLI, and run it as a real peer.

The CLI is installed with npm into ``<repo>/.cache/capgo-cli`` (not committed). Runs use a
temp working dir, a timeout and an environment without Capgo credentials. Tests that need
the CLI use the ``capgo_cli`` fixture (tests/conftest.py), which fails the run when node or npm
is missing: ``make test`` installs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CAPGO_CLI_VERSION = "8.68.1"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
CACHE_PREFIX = REPO_ROOT / ".cache" / "capgo-cli"
CLI_TIMEOUT_S = 120

# Preloaded with `node --import` (see the file): pins the CLI's 16-byte random draws.
PIN_RANDOM_MJS = Path(__file__).resolve().parent / "scripts" / "pin_random.mjs"


def cli_entry() -> Path:
    """Path of the pinned CLI's entry script, installing it with npm if missing.

    Raises RuntimeError if npm fails or the installed version is not the pinned one.
    """
    pkg_dir = CACHE_PREFIX / "node_modules" / "@capgo" / "cli"
    entry = pkg_dir / "dist" / "index.js"
    if not _installed_version_ok(pkg_dir):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed; cannot install @capgo/cli")
        CACHE_PREFIX.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                npm,
                "install",
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--prefix",
                str(CACHE_PREFIX),
                f"@capgo/cli@{CAPGO_CLI_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        if not _installed_version_ok(pkg_dir):
            raise RuntimeError(f"@capgo/cli {CAPGO_CLI_VERSION} did not install into {pkg_dir}")
    return entry


def _installed_version_ok(pkg_dir: Path) -> bool:
    try:
        meta = json.loads((pkg_dir / "package.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("version") == CAPGO_CLI_VERSION and (pkg_dir / "dist/index.js").is_file())


def clean_env() -> dict[str, str]:
    """The caller's environment minus anything that could hold Capgo credentials."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("CAPGO", "SUPABASE")) and "TOKEN" not in k.upper()
    }
    env["CI"] = "1"
    env["NO_COLOR"] = "1"
    return env


@dataclass
class CapgoCli:
    """The pinned CLI, run in a project directory prepared for offline use."""

    entry: Path
    node: str

    def run(
        self,
        args: Sequence[str],
        cwd: Path,
        pin_random: Sequence[bytes] = (),
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.node]
        env = clean_env()
        if pin_random:
            cmd += ["--import", PIN_RANDOM_MJS.as_uri()]
            env["CAPGO_PIN_RANDOM"] = ",".join(b.hex() for b in pin_random)
        cmd += [str(self.entry), *args]
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"capgo {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def json(
        self, args: Sequence[str], cwd: Path, pin_random: Sequence[bytes] = ()
    ) -> dict[str, str]:
        """Run with --json and parse the JSON object the CLI prints last."""
        out = self.run([*args, "--json"], cwd, pin_random).stdout
        start = out.rfind("\n{")
        data = json.loads(out[start + 1 :] if start >= 0 else out[out.index("{") :])
        assert isinstance(data, dict)
        return data


def make_project(root: Path, updater_version: str = "8.51.23") -> Path:
    """A minimal Capacitor project the CLI accepts offline (config, package.json, updater)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "capacitor.config.json").write_text(
        json.dumps({"appId": "com.example.hsmsign", "appName": "hsmsign", "webDir": "www"})
    )
    (root / "package.json").write_text(
        json.dumps(
            {
                "name": "hsmsign-capgo-peer",
                "version": "1.0.0",
                "dependencies": {"@capgo/capacitor-updater": updater_version},
            }
        )
    )
    # The CLI reads the installed updater's version to choose the checksum format.
    upd = root / "node_modules" / "@capgo" / "capacitor-updater"
    upd.mkdir(parents=True, exist_ok=True)
    (upd / "package.json").write_text(
        json.dumps({"name": "@capgo/capacitor-updater", "version": updater_version})
    )
    return root
