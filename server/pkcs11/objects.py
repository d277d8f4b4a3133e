"""What the token says about a key object, as a plain value (no python-pkcs11 type).

The key ring (``server.keyring.join``) builds keys from these, so it can be tested without a
token.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyObjectInfo:
    """What the token says about one private key object and its public half."""

    cka_id: bytes
    label: str
    modulus: int
    public_exponent: int
    can_sign: bool
    can_decrypt: bool
    can_unwrap: bool
    local: bool
    never_extractable: bool
    always_sensitive: bool
    extractable: bool
    sensitive: bool
