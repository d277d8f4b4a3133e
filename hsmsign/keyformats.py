"""Public-key formats users paste, and the identifiers hsmsign reports for a key version.

Shared, I/O-free: the daemon and the client compute fingerprints, PKCS#1 PEMs and Capgo
key_ids here and nowhere else.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def spki_der(public_key: rsa.RSAPublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_pem(public_key: rsa.RSAPublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def pkcs1_pem(public_key: rsa.RSAPublicKey) -> str:
    """``-----BEGIN RSA PUBLIC KEY-----``: the form capacitor-updater embeds."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    ).decode("ascii")


def fingerprint(public_key: rsa.RSAPublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, lowercase hex: hsmsign's key identifier."""
    return hashlib.sha256(spki_der(public_key)).hexdigest()


PKCS1_PUBLIC_HEADER: Final = "-----BEGIN RSA PUBLIC KEY-----"
SPKI_PUBLIC_HEADER: Final = "-----BEGIN PUBLIC KEY-----"
_KEY_ID_CHARS: Final = 20


def capgo_key_id_of_pem(public_pem: str) -> str:
    """Capgo's key_id: the first 20 characters of a PKCS#1 public PEM's base64 body.

    Raises ValueError if the text is not a PKCS#1 public PEM or its body is too short.
    """
    if not public_pem.strip().startswith(PKCS1_PUBLIC_HEADER):
        raise ValueError(
            f"key_id needs a PKCS#1 public PEM ({PKCS1_PUBLIC_HEADER}), which is what apps embed"
        )
    body = "".join(
        "".join(line.split()) for line in public_pem.splitlines() if not line.startswith("-----")
    )
    if len(body) < _KEY_ID_CHARS:
        raise ValueError("public key PEM body is too short to be an RSA key")
    return body[:_KEY_ID_CHARS]


def capgo_key_id(public_key: rsa.RSAPublicKey) -> str:
    """Capgo's key_id of a public key (see capgo_key_id_of_pem)."""
    return capgo_key_id_of_pem(pkcs1_pem(public_key))


def public_key_from_numbers(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()
