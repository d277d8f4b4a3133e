"""The key ring's background check (server.keyring.KeyRing._check): it reads only the state
document while nothing changed, and reads the key objects again when the state changed, when
a destruction falls due, and at least every FULL_SCAN_SECONDS. Run in a subprocess on its own
token, with the real token objects; the object scans are counted, not replaced."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import HSMSIGND, REPO
from tests.harness import script
from tests.harness.tokens import token_with_keys


def test_check_reads_key_objects_only_when_needed(tmp_path: Path) -> None:
    token, config = token_with_keys(
        tmp_path,
        ["demo"],
        extra="[keyring]\nmin_destruction_delay_hours = 0\nrefresh_seconds = 3600\n"
        "dev_unsafe_allow_short_destruction_delay = true\n",
    )
    r = subprocess.run(
        [sys.executable, script("keyring_check_scans.py"), str(config), HSMSIGND],
        cwd=REPO,
        env={**token.env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["quiet"] == 0  # nothing changed: the state document only
    assert out["after_change"] == 1 and out["names"] == ["demo", "fresh"]
    assert out["settled"] == 1
    assert out["backstop"] == 2
    assert out["scheduled"] == 3
    assert out["due"] >= 4 and out["v1_objects"] in ([], [False])
