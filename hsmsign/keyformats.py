"""Public-key formats users paste, and the identifiers hsmsign reports for a key version."""

from __future__ import annotations

import hashlib

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


def capgo_key_id(public_key: rsa.RSAPublicKey) -> str:
    """Capgo's key_id: the first 20 characters of the PKCS#1 public PEM's base64 body."""
    body = "".join(
        line for line in pkcs1_pem(public_key).splitlines() if not line.startswith("-----")
    )
    return body[:20]


def public_key_from_numbers(modulus: int, exponent: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()
