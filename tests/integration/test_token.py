"""The token layer: key attributes as OpenSC sees them, and thread safety
(docs/design-facts.md, fact 1)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import PROXY_MODULE, SOFTHSM_MODULE, TokenDir, write_config


def _private_key_block(listing: str, label: str) -> str:
    blocks = listing.split("Private Key Object")
    return next(b for b in blocks[1:] if f"label:      {label}" in b)


def test_private_key_is_sensitive_and_never_extractable(token: TokenDir) -> None:
    out = token.pkcs11_tool("--list-objects", "--type", "privkey")
    block = _private_key_block(out, "hsmsign:demo:v1")
    assert "RSA" in block
    assert "Access:     sensitive, always sensitive, never extractable, local" in block
    assert "Usage:      sign" in block
    assert "decrypt" not in block and "unwrap" not in block


def test_private_exponent_cannot_be_read(token: TokenDir, tmp_path: Path) -> None:
    """Asking the token for the private key's secret attributes is refused (CKA_SENSITIVE)."""
    script = tmp_path / "leak.py"
    script.write_text(
        textwrap.dedent(f"""
        import pkcs11
        from pkcs11 import Attribute, ObjectClass
        lib = pkcs11.lib({SOFTHSM_MODULE!r})
        tok = lib.get_token(token_label={token.label!r})
        with tok.open(user_pin=open({str(token.pin_file)!r}).read()) as s:
            key = s.get_key(ObjectClass.PRIVATE_KEY, label="hsmsign:demo:v1")
            for attr in (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.VALUE):
                try:
                    key[attr]
                    print("LEAKED", attr)
                except (pkcs11.AttributeSensitive, pkcs11.AttributeTypeInvalid) as e:
                    print("refused", type(e).__name__)
    """)
    )
    r = subprocess.run(
        [sys.executable, str(script)], env=token.env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "LEAKED" not in r.stdout
    assert r.stdout.count("refused AttributeSensitive") >= 2


WORKLOAD = textwrap.dedent("""
    import hashlib, sys, threading
    from pathlib import Path
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from cryptography.hazmat.primitives import hashes
    from server import config as cfgmod, operations
    from server.keyring import KeyRing, KeyReference, Purpose
    from server.token import Token

    cfg = cfgmod.load(Path(sys.argv[1]))
    token = Token(cfg.token)
    ring = KeyRing(token, cfg)
    key = ring.resolve(KeyReference(name="demo"), Purpose.SIGN)
    scheme = operations.SCHEMES["rsa-pkcs1-sha256"]
    errors, done = [], [0]
    def work(i):
        try:
            for n in range(150):
                d = hashlib.sha256(f"{i}-{n}".encode()).digest()
                sig = operations.sign_digest(token, key, scheme, d)
                key.public_key.verify(sig, d, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
                done[0] += 1
        except Exception as e:
            errors.append(repr(e))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in threads]; [t.join() for t in threads]
    print(cfg.token.threading, done[0], len(errors), errors[:3])
    token.close()
    sys.exit(1 if errors else 0)
""")


@pytest.mark.parametrize(
    ("module", "mode"),
    [
        (PROXY_MODULE, "parallel"),  # p11-kit initialises SoftHSM2 with OS locking
        (SOFTHSM_MODULE, "serialized"),  # loaded directly: the default is one lock for all calls
    ],
)
def test_many_threads_sign_safely(token: TokenDir, tmp_path: Path, module: str, mode: str) -> None:
    """8 threads x 150 signatures on 4 sessions; every signature verifies, no crash.

    Run in a subprocess: without the right threading mode SoftHSM2 crashes the process
    (double free, segfault) within seconds, which would take pytest down with it.
    """
    cfg = write_config(tmp_path / "c.toml", token, module=module)
    script = tmp_path / "load.py"
    script.write_text(WORKLOAD)
    r = subprocess.run(
        [sys.executable, str(script), str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split()[:3] == [mode, "1200", "0"]


def test_threading_default_follows_module(token: TokenDir, tmp_path: Path) -> None:
    from server import config as cfgmod

    direct = cfgmod.load(write_config(tmp_path / "a.toml", token, module=SOFTHSM_MODULE))
    proxy = cfgmod.load(write_config(tmp_path / "b.toml", token, module=PROXY_MODULE))
    assert direct.token.threading == "serialized"
    assert proxy.token.threading == "parallel"
