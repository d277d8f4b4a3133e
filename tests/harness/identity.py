"""Test PKI for the identity tests: CAs, client certificates with chosen names, a CRL.

Everything is made here with cryptography (EC P-256, short lifetimes); nothing is read from
disk. Files are written PEM, keys 0600, the way the daemon and the client read them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Issued:
    """A key and its certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, stem: Path) -> tuple[Path, Path]:
        """Writes STEM.crt and STEM.key (0600); returns their paths."""
        crt, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        crt.write_bytes(self.cert_pem)
        key.write_bytes(
            self.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(key, 0o600)
        return crt, key


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(name: str) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Issued(key, cert)


def make_leaf(
    ca: Issued,
    cn: str | None = None,
    *,
    uri: str | None = None,
    dns: str | None = None,
    email: str | None = None,
    server: bool = False,
    expired: bool = False,
) -> Issued:
    """A certificate signed by ``ca`` carrying exactly the names given (``server``: also the
    DNS name localhost and IP 127.0.0.1, for the daemon's own certificate)."""
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmsign tests"))
    sans: list[x509.GeneralName] = []
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    if dns:
        sans.append(x509.DNSName(dns))
    if email:
        sans.append(x509.RFC822Name(email))
    if server:
        sans += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    start = _now() - (datetime.timedelta(days=3) if expired else datetime.timedelta(minutes=5))
    end = _now() - datetime.timedelta(days=1) if expired else _now() + datetime.timedelta(days=1)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(key, b.sign(ca.key, hashes.SHA256()))


def make_crl(ca: Issued, revoked: list[x509.Certificate]) -> bytes:
    """A PEM CRL signed by ``ca`` listing ``revoked``."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(_now() - datetime.timedelta(minutes=5))
        .next_update(_now() + datetime.timedelta(days=1))
    )
    for cert in revoked:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(_now() - datetime.timedelta(minutes=1))
            .build()
        )
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


class TokenIssuer:
    """A test OIDC issuer: its own RSA and EC keys, its JWKS, and ID tokens it signs."""

    def __init__(self, iss: str = "https://ci.example.org", audience: str = "hsmsign") -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.iss, self.audience = iss, audience
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())

    def jwks(self, *, rsa_kid: str = "rsa-1", ec_kid: str = "ec-1") -> dict[str, object]:
        import jwt

        rsa_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa.public_key(), as_dict=True)
        ec_jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.ec.public_key(), as_dict=True)
        rsa_jwk.update(kid=rsa_kid, use="sig")
        ec_jwk.update(kid=ec_kid, use="sig")
        return {"keys": [rsa_jwk, ec_jwk]}

    def claims(self, **changes: object) -> dict[str, object]:
        now = int(datetime.datetime.now(datetime.UTC).timestamp())
        claims: dict[str, object] = {
            "iss": self.iss,
            "aud": self.audience,
            "sub": "repo:acme/app:ref:refs/heads/main",
            "repository": "acme/app",
            "ref": "refs/heads/main",
            "environment": "release",
            "iat": now - 10,
            "nbf": now - 10,
            "exp": now + 300,
        }
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, *, alg: str = "RS256", kid: str | None = None, **changes: object) -> str:
        import jwt

        key = self.rsa if alg == "RS256" else self.ec
        kid = kid or ("rsa-1" if alg == "RS256" else "ec-1")
        return jwt.encode(self.claims(**changes), key, algorithm=alg, headers={"kid": kid})

    def unsigned_token(self) -> str:
        """``alg: none``: no signature at all."""
        return _jws({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, self.claims(), b"")

    def hs256_with_public_key(self) -> str:
        """HS256 keyed with the issuer's public key (PEM), the classic algorithm confusion."""
        import hashlib
        import hmac

        pem = self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
        signing_input = _b64(header) + "." + _b64(self.claims())
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + _b64url(mac)


def _b64url(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64(obj: object) -> str:
    import json

    return _b64url(json.dumps(obj, separators=(",", ":")).encode())


def _jws(header: dict[str, object], claims: dict[str, object], signature: bytes) -> str:
    return _b64(header) + "." + _b64(claims) + "." + _b64url(signature)
