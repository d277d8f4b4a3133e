"""Where things are: the repo, the venv's console scripts, the PKCS#11 modules, the scripts."""

from __future__ import annotations

import sys
from pathlib import Path

from server.tomltable import MULTIARCH

REPO = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent
HSMSIGND = str(BIN / "hsmsignd")
HSMSIGN = str(BIN / "hsmsign")
PROXY_MODULE = f"/usr/lib/{MULTIARCH}/p11-kit-proxy.so"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def script(name: str) -> str:
    """Path of a program in tests/harness/scripts/ (run as ``python PATH ARGS``).

    Raises FileNotFoundError if there is no such script."""
    path = SCRIPTS / name
    if not path.is_file():
        raise FileNotFoundError(f"no harness script {path}")
    return str(path)
