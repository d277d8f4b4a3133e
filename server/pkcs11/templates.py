"""The attribute templates of every object hsmsign creates in a token, written out in full.

A template here lists every attribute that matters for the object's security, so a reader can
check a key's properties in one place (no library defaults filled in behind it): private keys
are sensitive, never extractable, and have exactly one purpose (docs/threat-model.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

from pkcs11 import Attribute, KeyType, ObjectClass

#: Label of the per-token secret that derives PKCS#1 v1.5 implicit-rejection keys.
IMPLICIT_REJECTION_LABEL: Final = "hsmsign:implicit-rejection"

#: Label of the token's import wrapping key (server.ops.key_import), outside the ring's
#: "hsmsign:" prefix so the ring never takes it for a key version.
IMPORT_WRAPPING_LABEL: Final = "hsmsign-import-wrapping"
#: Size of the import wrapping key.
IMPORT_WRAPPING_BITS: Final = 3072

Template = dict[Attribute, Any]


def rsa_public_key_template(label: str, cka_id: bytes, *, sign: bool, decrypt: bool) -> Template:
    """A key version's public object: on the token, readable, only its purpose's uses.

    The caller adds the numbers (MODULUS_BITS and PUBLIC_EXPONENT to generate, MODULUS and
    PUBLIC_EXPONENT to import).
    """
    return {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: label,
        Attribute.ID: cka_id,
        Attribute.VERIFY: sign,
        Attribute.VERIFY_RECOVER: False,
        Attribute.ENCRYPT: decrypt,
        Attribute.WRAP: decrypt,
        Attribute.DERIVE: False,
    }


def rsa_private_key_template(label: str, cka_id: bytes, *, sign: bool, decrypt: bool) -> Template:
    """A key version's private object: sensitive, never extractable, one purpose only.

    The caller adds the private numbers when it imports a key.
    """
    return {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.LABEL: label,
        Attribute.ID: cka_id,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: sign,
        Attribute.SIGN_RECOVER: False,
        Attribute.DECRYPT: decrypt,
        Attribute.UNWRAP: decrypt,
        Attribute.DERIVE: False,
    }


#: The per-token implicit-rejection secret (256-bit generic secret): on the token, sensitive,
#: never extractable, not modifiable, and good for one thing only (HMAC sign).
IMPLICIT_REJECTION_SECRET_TEMPLATE: Final[Mapping[Attribute, Any]] = MappingProxyType(
    {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.LABEL: IMPLICIT_REJECTION_LABEL,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.SIGN: True,
        Attribute.VERIFY: False,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
)

#: C_UnwrapKey's result: a session-only (CKA_TOKEN=false), readable secret that is read once
#: and destroyed at once; it can do nothing.
SESSION_SECRET_TEMPLATE: Final[Mapping[Attribute, Any]] = MappingProxyType(
    {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.GENERIC_SECRET,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: False,
        Attribute.EXTRACTABLE: True,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
)


def import_wrapping_public_template(cka_id: bytes) -> Template:
    """The import wrapping key's public object: on the token, readable, and good for nothing
    in the token (clients wrap to it with its SPKI, outside)."""
    return {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: IMPORT_WRAPPING_LABEL,
        Attribute.ID: cka_id,
        Attribute.MODULUS_BITS: IMPORT_WRAPPING_BITS,
        Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
        Attribute.VERIFY: False,
        Attribute.VERIFY_RECOVER: False,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
        Attribute.DERIVE: False,
    }


def import_wrapping_private_template(cka_id: bytes) -> Template:
    """The import wrapping key's private object: sensitive, never extractable, and it can
    only unwrap (no sign, no decrypt)."""
    return {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.KEY_TYPE: KeyType.RSA,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.LABEL: IMPORT_WRAPPING_LABEL,
        Attribute.ID: cka_id,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: False,
        Attribute.SIGN_RECOVER: False,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: True,
        Attribute.DERIVE: False,
    }


#: The ephemeral AES key of a wrapped import, as C_UnwrapKey makes it: a session object
#: (CKA_TOKEN=false), sensitive, not extractable, that can only unwrap; destroyed at once.
IMPORT_AES_TEMPLATE: Final[Mapping[Attribute, Any]] = MappingProxyType(
    {
        Attribute.CLASS: ObjectClass.SECRET_KEY,
        Attribute.KEY_TYPE: KeyType.AES,
        Attribute.TOKEN: False,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: True,
        Attribute.DERIVE: False,
    }
)


def data_object_template(application: str, label: str, value: bytes) -> Template:
    """A CKO_DATA object on the token, private (readable only after login). Its value cannot
    be changed once created (docs/design-facts.md, fact 7): state is replaced, not edited."""
    return {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.MODIFIABLE: True,
        Attribute.APPLICATION: application,
        Attribute.LABEL: label,
        Attribute.VALUE: value,
    }
