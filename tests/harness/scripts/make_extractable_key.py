"""Makes a sign-only RSA key pair 'hsmsign:ext:v1' that is EXTRACTABLE, as a careless tool
would (pkcs11-tool cannot make a sign-only key on SoftHSM2: decrypt is on by default).
Usage: python make_extractable_key.py TOKEN_LABEL PIN (SOFTHSM2_CONF in the environment)."""

from __future__ import annotations

import sys

import pkcs11
from pkcs11 import Attribute as A
from pkcs11 import KeyType, Mechanism

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def main() -> None:
    lib = pkcs11.lib(SOFTHSM_MODULE)
    with lib.get_token(token_label=sys.argv[1]).open(user_pin=sys.argv[2], rw=True) as s:
        common = {A.TOKEN: True, A.LABEL: "hsmsign:ext:v1", A.ID: b"\x0a\x0b"}
        s.generate_keypair(
            KeyType.RSA,
            2048,
            store=True,
            mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
            public_template={**common, A.VERIFY: True, A.ENCRYPT: False, A.WRAP: False},
            private_template={
                **common,
                A.PRIVATE: True,
                A.SENSITIVE: True,
                A.EXTRACTABLE: True,
                A.SIGN: True,
                A.DECRYPT: False,
                A.UNWRAP: False,
            },
        )


if __name__ == "__main__":
    main()
