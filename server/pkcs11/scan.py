"""Reading key objects: a scan that runs again when another process changed the token under
it, and what a private key object says about itself as a plain ``KeyObjectInfo``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from pkcs11 import Attribute

from server.pkcs11.errors import ATTRIBUTE_UNREADABLE, SCAN_COLLIDED
from server.pkcs11.objects import KeyObjectInfo

T = TypeVar("T")

#: A scan that keeps colliding with another process's writes is reported after this many.
_SCAN_ATTEMPTS = 5


def rescan_if_changed(scan: Callable[[], T]) -> T:
    """Runs an object scan again when another process changed the token's objects while it
    read them (docs/design-facts.md fact 7: such changes are visible at once). A scan only
    reads, so a retry is safe; the fifth collision in a row is reported."""
    for attempt in range(_SCAN_ATTEMPTS):
        try:
            return scan()
        except SCAN_COLLIDED:
            if attempt == _SCAN_ATTEMPTS - 1:
                raise
            time.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")


def _flag(obj: Any, attr: Attribute) -> bool:
    try:
        return bool(obj[attr])
    except ATTRIBUTE_UNREADABLE:
        return False


def describe_key(priv: Any) -> KeyObjectInfo:
    modulus = int.from_bytes(bytes(priv[Attribute.MODULUS]), "big")
    exponent = int.from_bytes(bytes(priv[Attribute.PUBLIC_EXPONENT]), "big")
    return KeyObjectInfo(
        cka_id=bytes(priv[Attribute.ID]),
        label=priv[Attribute.LABEL] or "",
        modulus=modulus,
        public_exponent=exponent,
        can_sign=_flag(priv, Attribute.SIGN),
        can_decrypt=_flag(priv, Attribute.DECRYPT),
        can_unwrap=_flag(priv, Attribute.UNWRAP),
        local=_flag(priv, Attribute.LOCAL),
        never_extractable=_flag(priv, Attribute.NEVER_EXTRACTABLE),
        always_sensitive=_flag(priv, Attribute.ALWAYS_SENSITIVE),
        extractable=_flag(priv, Attribute.EXTRACTABLE),
        sensitive=_flag(priv, Attribute.SENSITIVE),
    )
