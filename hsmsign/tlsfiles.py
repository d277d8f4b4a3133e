"""Checks of TLS files before they reach gRPC.

gRPC's C core reports a certificate that is not PEM, or a key that does not belong to its
certificate, only as a failed handshake or a failed listen, and aborts the whole process
(SIGABRT) on a client certificate given without its key. The client and the daemon check
their files here first, so that the user reads which file is wrong.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def problem(
    ca: bytes | None,
    cert: bytes | None,
    key: bytes | None,
    *,
    ca_name: str = "the CA bundle",
    cert_name: str = "the certificate",
    key_name: str = "the private key",
) -> str | None:
    """What is wrong with these files, in one line naming the file; None when nothing is.

    ``ca`` must hold at least one PEM certificate; ``cert`` and ``key`` go together: a PEM
    certificate (chain) and the unencrypted PEM private key of its first certificate.
    """
    if ca is not None and not _certificates(ca):
        return f"{ca_name} holds no PEM certificate"
    if (cert is None) != (key is None):
        return f"{cert_name if cert is not None else key_name} is given without its pair"
    if cert is None or key is None:
        return None
    chain = _certificates(cert)
    if not chain:
        return f"{cert_name} holds no PEM certificate"
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError):
        return f"{key_name} is not an unencrypted PEM private key"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        return f"the private key in {key_name} does not belong to the certificate in {cert_name}"
    return None


def _certificates(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []
