"""PKCS#1 v1.5 unwraps through a fault layer that refuses CKM_RSA_X_509 the way a refusing
token does. Usage: python unwrap_without_raw_rsa.py CONFIG; prints 'raw N pkcs M'."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import padding

from server import config as cfgmod
from server.errors import MechanismUnsupported
from server.keyring.model import KeyReference, Purpose
from server.keyring.ring import KeyRing
from server.ops import unwrap
from server.pkcs11.mechanisms import RSA_X_509
from server.pkcs11.session import Session
from server.pkcs11.token import Token


def main() -> None:
    calls = {"raw": 0, "pkcs": 0}
    real = Session.decrypt_or_none

    def refusing(self: Session, cka_id: bytes, mech: Any, data: bytes) -> Any:
        if mech is RSA_X_509:
            calls["raw"] += 1
            raise MechanismUnsupported("the token does not support CKM_RSA_X_509 (injected)")
        calls["pkcs"] += 1
        return real(self, cka_id, mech, data)

    setattr(Session, "decrypt_or_none", refusing)  # noqa: B010  (the injected fault)
    cfg = cfgmod.load(Path(sys.argv[1]))
    token = Token(cfg.token)
    ring = KeyRing(token, cfg)
    key = ring.resolve(KeyReference(name="legacy"), Purpose.UNWRAP)
    scheme = unwrap.SCHEMES["rsa-pkcs1v15"]
    opts = cfg.key_options("legacy")
    session_key = os.urandom(16)
    wrapped = key.public_key.encrypt(session_key, padding.PKCS1v15())
    assert unwrap.unwrap_session_key(token, key, scheme, wrapped, opts) == session_key
    bad = bytearray(wrapped)
    bad[-1] ^= 1
    first = unwrap.unwrap_session_key(token, key, scheme, bytes(bad), opts)
    again = unwrap.unwrap_session_key(token, key, scheme, bytes(bad), opts)
    other = bytearray(wrapped)
    other[-2] ^= 1
    third = unwrap.unwrap_session_key(token, key, scheme, bytes(other), opts)
    assert len(first) == 16 and first == again and first != third and first != session_key
    print("raw", calls["raw"], "pkcs", calls["pkcs"])
    token.close()


if __name__ == "__main__":
    main()
