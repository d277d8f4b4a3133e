"""Key administration on the token: used by the KeyAdmin service and by `hsmsignd keys`."""

from __future__ import annotations

import os

from server.errors import FailedPrecondition, InvalidArgument
from server.keyring import ALLOWED_BITS, KeyRing, KeyVersion, Purpose, check_name, version_label
from server.token import Token


def create_key(token: Token, ring: KeyRing, name: str, purpose: Purpose, bits: int) -> KeyVersion:
    """Generates version 1 of a new key inside the token. Raises if the name is taken."""
    check_name(name)
    if bits not in ALLOWED_BITS:
        raise InvalidArgument(f"RSA-{bits} is not offered; choose 2048, 3072 or 4096")
    ring.refresh()
    if any(k.name == name for k in ring.list_keys()):
        raise FailedPrecondition(f"a key named {name!r} already exists; rotate it instead")
    return _generate(token, ring, name, 1, purpose, bits)


def _generate(
    token: Token, ring: KeyRing, name: str, version: int, purpose: Purpose, bits: int
) -> KeyVersion:
    label = version_label(name, version)
    with token.session(f"generating RSA-{bits} key {label}") as s:
        s.generate_rsa_keypair(
            bits,
            label,
            os.urandom(16),
            sign=purpose is Purpose.SIGN,
            decrypt=purpose is Purpose.UNWRAP,
        )
    ring.refresh()
    key = ring.get(name)
    return next(v for v in key.versions if v.version == version)
