"""PKCS#1 v1.5 unwrap on a token that refuses raw RSA (CKM_RSA_X_509).

SoftHSM2 allows raw RSA, so the refusal is injected by a fault layer over the real token: the
injected Session raises the same MechanismUnsupported a refusing token produces. The daemon
must then fall back to CKM_RSA_PKCS and keep implicit rejection. Run in a subprocess, since
python-pkcs11 keeps one loaded module per process.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.harness import script
from tests.harness.tokens import KeySpec, token_with_keys


def test_pkcs1v15_falls_back_to_ckm_rsa_pkcs_with_implicit_rejection(tmp_path: Path) -> None:
    _token, cfg = token_with_keys(
        tmp_path,
        [KeySpec("legacy", "unwrap")],
        label="hsmsign-fallback",
        extra="[keys.legacy]\nallow_pkcs1v15_unwrap = true\n",
    )
    r = subprocess.run(
        [sys.executable, script("unwrap_without_raw_rsa.py"), str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=None,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # raw RSA was asked for once, then remembered as refused; every unwrap used CKM_RSA_PKCS
    assert r.stdout.split() == ["raw", "1", "pkcs", "4"]
