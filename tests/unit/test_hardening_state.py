"""The daemon's process hardening, as the kernel reports it for the process that ran it
(tests/integration/test_process_hardening.py checks the running daemon's processes)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.harness import REPO, script


def test_hardening_leaves_no_core_limit_and_a_process_that_is_not_dumpable() -> None:
    r = subprocess.run(
        [sys.executable, script("hardened_state.py")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    )
    assert json.loads(r.stdout) == {"core_limit": [0, 0], "dumpable": 0}
