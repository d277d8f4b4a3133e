"""A test OIDC issuer for the identity tests: its own keys, its JWKS, and the ID tokens it
signs (good ones, and the classic forgeries). Certificates are in :mod:`tests.harness.pki`."""

from __future__ import annotations

import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


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
