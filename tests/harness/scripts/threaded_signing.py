"""8 threads x 150 signatures on the token's session pool; every signature is verified.
Usage: python threaded_signing.py CONFIG; prints 'THREADING DONE ERRORS [first errors]' and
exits 1 if any call failed (a crash ends the process instead, which is what the test checks)."""

from __future__ import annotations

import hashlib
import sys
import threading
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from server import config as cfgmod
from server.keyring.model import KeyReference, Purpose
from server.keyring.ring import KeyRing
from server.ops import signing as operations
from server.pkcs11.token import Token


def main() -> None:
    cfg = cfgmod.load(Path(sys.argv[1]))
    token = Token(cfg.token)
    ring = KeyRing(token, cfg)
    key = ring.resolve(KeyReference(name="demo"), Purpose.SIGN)
    scheme = operations.SCHEMES["rsa-pkcs1-sha256"]
    errors: list[str] = []
    done = [0]

    def work(i: int) -> None:
        try:
            for n in range(150):
                d = hashlib.sha256(f"{i}-{n}".encode()).digest()
                sig = operations.sign_digest(token, key, scheme, d)
                key.public_key.verify(sig, d, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
                done[0] += 1
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(cfg.token.threading, done[0], len(errors), errors[:3])
    token.close()
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()
