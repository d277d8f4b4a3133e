"""PKCS#1 v1.5 unwrap on a token that refuses raw RSA (CKM_RSA_X_509).

SoftHSM2 allows raw RSA, so the refusal is injected by a fault layer over the real token: the
injected Session raises the same MechanismUnsupported a refusing token produces. The daemon
must then fall back to CKM_RSA_PKCS and keep implicit rejection. Run in a subprocess, since
python-pkcs11 keeps one loaded module per process.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import REPO, hsmsignd, make_token, write_config

SCRIPT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from cryptography.hazmat.primitives.asymmetric import padding
    from server import config as cfgmod, unwrap
    from server.errors import MechanismUnsupported
    from server.keyring import KeyRing, KeyReference, Purpose
    from server.token import RSA_X_509, Session, Token

    calls = {"raw": 0, "pkcs": 0}
    real = Session.decrypt_or_none

    def refusing(self, cka_id, mech, data):
        if mech is RSA_X_509:
            calls["raw"] += 1
            raise MechanismUnsupported("the token does not support CKM_RSA_X_509 (injected)")
        calls["pkcs"] += 1
        return real(self, cka_id, mech, data)

    Session.decrypt_or_none = refusing
    cfg = cfgmod.load(Path(sys.argv[1]))
    token = Token(cfg.token)
    ring = KeyRing(token, cfg)
    key = ring.resolve(KeyReference(name="legacy"), Purpose.UNWRAP)
    scheme = unwrap.SCHEMES["rsa-pkcs1v15"]
    opts = cfg.key_options("legacy")
    session_key = os.urandom(16)
    wrapped = key.public_key.encrypt(session_key, padding.PKCS1v15())
    assert unwrap.unwrap_session_key(token, key, scheme, wrapped, opts) == session_key
    bad = bytearray(wrapped); bad[-1] ^= 1; bad = bytes(bad)
    first = unwrap.unwrap_session_key(token, key, scheme, bad, opts)
    again = unwrap.unwrap_session_key(token, key, scheme, bad, opts)
    other = bytearray(wrapped); other[-2] ^= 1
    third = unwrap.unwrap_session_key(token, key, scheme, bytes(other), opts)
    assert len(first) == 16 and first == again and first != third and first != session_key
    print("raw", calls["raw"], "pkcs", calls["pkcs"])
    token.close()
""")


def test_pkcs1v15_falls_back_to_ckm_rsa_pkcs_with_implicit_rejection(tmp_path: Path) -> None:
    token = make_token(tmp_path / "tok", "hsmsign-fallback")
    cfg = write_config(
        tmp_path / "c.toml", token, extra="[keys.legacy]\nallow_pkcs1v15_unwrap = true\n"
    )
    hsmsignd(cfg, "keys", "create", "legacy", "--purpose", "unwrap")
    script = tmp_path / "fallback.py"
    script.write_text(SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script), str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=None,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # raw RSA was asked for once, then remembered as refused; every unwrap used CKM_RSA_PKCS
    assert r.stdout.split() == ["raw", "1", "pkcs", "4"]
