"""Asks the token for a private key's secret attributes; prints 'refused NAME' or 'LEAKED'
per attribute. Usage: python read_private_exponent.py MODULE TOKEN_LABEL PIN_FILE KEY_LABEL."""

from __future__ import annotations

import sys
from pathlib import Path

import pkcs11
from pkcs11 import Attribute, ObjectClass


def main() -> None:
    module, label, pin_file, key_label = sys.argv[1:5]
    tok = pkcs11.lib(module).get_token(token_label=label)
    with tok.open(user_pin=Path(pin_file).read_text()) as s:
        key = s.get_key(ObjectClass.PRIVATE_KEY, label=key_label)
        for attr in (Attribute.PRIVATE_EXPONENT, Attribute.PRIME_1, Attribute.VALUE):
            try:
                key[attr]
                print("LEAKED", attr)
            except (pkcs11.AttributeSensitive, pkcs11.AttributeTypeInvalid) as e:
                print("refused", type(e).__name__)


if __name__ == "__main__":
    main()
