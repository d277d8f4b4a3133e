"""The PKCS#11 mechanisms hsmsign uses, with their parameters: one table.

python-pkcs11's defaults are traps (the default RSA sign mechanism is SHA512_RSA_PKCS; every
PSS variant defaults to SHA-1 parameters: docs/design-facts.md, fact 4), so every call passes
a mechanism and its parameters from ``MECHANISMS``, never a library default.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from pkcs11 import Mechanism
from pkcs11.mechanisms import MGF


@dataclass(frozen=True)
class Mech:
    """A PKCS#11 mechanism with its parameters, always explicit (never a library default)."""

    #: hsmsign's name for it (the key of ``MECHANISMS``).
    name: str
    mechanism: Mechanism
    param: Any
    #: How messages name it (the token's name and the parameters).
    description: str


MECHANISMS: Final = MappingProxyType(
    {
        m.name: m
        for m in (
            # Signing: PKCS#1 v1.5 over a DigestInfo built here; also Capgo's private-encrypt
            # (docs/design-facts.md, fact 5) and the PKCS#1 v1.5 unwrap fallback.
            Mech("rsa-pkcs", Mechanism.RSA_PKCS, None, "CKM_RSA_PKCS"),
            Mech(
                "rsa-pss-sha256",
                Mechanism.RSA_PKCS_PSS,
                (Mechanism.SHA256, MGF.SHA256, 32),
                "CKM_RSA_PKCS_PSS with SHA-256, MGF1-SHA-256, 32-byte salt",
            ),
            Mech(
                "rsa-pss-sha384",
                Mechanism.RSA_PKCS_PSS,
                (Mechanism.SHA384, MGF.SHA384, 48),
                "CKM_RSA_PKCS_PSS with SHA-384, MGF1-SHA-384, 48-byte salt",
            ),
            Mech(
                "rsa-pss-sha512",
                Mechanism.RSA_PKCS_PSS,
                (Mechanism.SHA512, MGF.SHA512, 64),
                "CKM_RSA_PKCS_PSS with SHA-512, MGF1-SHA-512, 64-byte salt",
            ),
            # Unwrap.
            Mech(
                "rsa-oaep-sha1",
                Mechanism.RSA_PKCS_OAEP,
                (Mechanism.SHA_1, MGF.SHA1, None),
                "CKM_RSA_PKCS_OAEP with SHA-1, MGF1-SHA-1, no label",
            ),
            Mech(
                "rsa-oaep-sha256",
                Mechanism.RSA_PKCS_OAEP,
                (Mechanism.SHA256, MGF.SHA256, None),
                "CKM_RSA_PKCS_OAEP with SHA-256, MGF1-SHA-256, no label",
            ),
            # PKCS#1 v1.5 unwrap: raw RSA lets the padding be checked outside the token's
            # error path (implicit rejection); the HMAC derives the rejection value inside the
            # token, from a secret made with the key generator below.
            Mech("rsa-x-509", Mechanism.RSA_X_509, None, "CKM_RSA_X_509 (raw RSA)"),
            Mech("sha256-hmac", Mechanism.SHA256_HMAC, None, "CKM_SHA256_HMAC"),
            Mech(
                "generic-secret-key-gen",
                Mechanism.GENERIC_SECRET_KEY_GEN,
                None,
                "CKM_GENERIC_SECRET_KEY_GEN (256 bits)",
            ),
            # Key import without plaintext (server.ops.key_import): the PKCS#8 comes wrapped
            # with an ephemeral AES key, which comes wrapped with RSA-OAEP (above).
            Mech(
                "aes-key-wrap-pad",
                Mechanism.AES_KEY_WRAP_PAD,
                None,
                "CKM_AES_KEY_WRAP_PAD (RFC 5649)",
            ),
            # Key pair generation.
            Mech(
                "rsa-pkcs-key-pair-gen",
                Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                None,
                "CKM_RSA_PKCS_KEY_PAIR_GEN",
            ),
        )
    }
)

# Names for the rows, so that a typo is an import error rather than a KeyError at call time.
RSA_PKCS: Final = MECHANISMS["rsa-pkcs"]
RSA_PSS_SHA256: Final = MECHANISMS["rsa-pss-sha256"]
RSA_PSS_SHA384: Final = MECHANISMS["rsa-pss-sha384"]
RSA_PSS_SHA512: Final = MECHANISMS["rsa-pss-sha512"]
RSA_OAEP_SHA1: Final = MECHANISMS["rsa-oaep-sha1"]
RSA_OAEP_SHA256: Final = MECHANISMS["rsa-oaep-sha256"]
RSA_X_509: Final = MECHANISMS["rsa-x-509"]
SHA256_HMAC: Final = MECHANISMS["sha256-hmac"]
GENERIC_SECRET_KEY_GEN: Final = MECHANISMS["generic-secret-key-gen"]
RSA_PKCS_KEY_PAIR_GEN: Final = MECHANISMS["rsa-pkcs-key-pair-gen"]
AES_KEY_WRAP_PAD: Final = MECHANISMS["aes-key-wrap-pad"]
