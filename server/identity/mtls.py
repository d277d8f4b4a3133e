"""Identities from verified client certificates.

gRPC has verified the chain against ``server.tls.client_ca`` before a call arrives; this
module takes the leaf from the auth context (``x509_pem_cert``), finds which configured CA
signed it, refuses it when that CA's CRL lists it, and applies the typed rules: each rule
matches one field only (a URI SAN, a DNS SAN, an email SAN or the subject CN) of a
certificate issued by the rule's own CA.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from server.errors import ConfigError, Unauthenticated
from server.identity.model import CertField, CertRule, Identity


def _load_certs(path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"{what}: {path} holds no PEM certificate") from None
    return certs


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def field_values(cert: x509.Certificate, field: CertField) -> list[str]:
    """The values of one certificate field: the subject CN(s), or one kind of SAN."""
    if field == "subject_cn":
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    kind: Any = {
        "uri_san": x509.UniformResourceIdentifier,
        "dns_san": x509.DNSName,
        "email_san": x509.RFC822Name,
    }[field]
    return [str(v) for v in san.get_values_for_type(kind)]


@dataclass(frozen=True)
class _BoundRule:
    rule: CertRule
    ca: x509.Certificate


class CertificateIdentifier:
    """The mTLS rules with their CA certificates and the client CRLs, loaded once."""

    def __init__(self, rules: Sequence[CertRule], client_ca: Path | None, crl: Path | None) -> None:
        """Raises ConfigError when a file is unreadable, a rule's CA is not one the TLS
        handshake trusts (``server.tls.client_ca``), or a CRL is signed by no client CA."""
        needed = client_ca is not None and (rules or crl is not None)
        trusted = _load_certs(client_ca, "server.tls.client_ca") if needed and client_ca else []
        if rules and client_ca is None:
            raise ConfigError(
                "identities.mtls: needs server.tls.client_ca (client certificates are only "
                "asked for when it is set)"
            )
        self._rules: list[_BoundRule] = []
        for rule in rules:
            for ca in _load_certs(rule.ca, f"identities.mtls {rule.name!r}: ca"):
                if ca not in trusted:
                    raise ConfigError(
                        f"identities.mtls {rule.name!r}: ca {rule.ca} is not in "
                        f"server.tls.client_ca, so no certificate it issued can connect"
                    )
                self._rules.append(_BoundRule(rule, ca))
        self._cas = trusted
        self._crls: list[tuple[x509.Certificate, x509.CertificateRevocationList]] = []
        if crl is not None:
            self._crls = list(_load_crls(crl, trusted))

    def identify(self, pem: bytes) -> Identity | None:
        """The identity of a verified client certificate; None when no rule names it.
        Raises Unauthenticated when the certificate is revoked."""
        try:
            leaf = x509.load_pem_x509_certificate(pem)
        except ValueError:
            raise Unauthenticated("the client certificate cannot be read") from None
        issuers = [ca for ca in self._cas if _signed_by(leaf, ca)]
        for ca, crl in self._crls:
            if ca in issuers and crl.get_revoked_certificate_by_serial_number(leaf.serial_number):
                raise Unauthenticated(
                    f"the client certificate (serial {leaf.serial_number:x}) is revoked"
                )
        for bound in self._rules:
            if bound.ca in issuers and bound.rule.value in field_values(leaf, bound.rule.field):
                return Identity(
                    kind="mtls",
                    name=bound.rule.name,
                    subject=f"{bound.rule.field} {bound.rule.value}",
                    issuer=bound.ca.subject.rfc4514_string(),
                )
        return None


def _load_crls(
    path: Path, cas: Iterable[x509.Certificate]
) -> Iterable[tuple[x509.Certificate, x509.CertificateRevocationList]]:
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"identities.client_crl: cannot read {path}: {e.strerror}") from None
    marker = b"-----BEGIN X509 CRL-----"
    blocks = [marker + b for b in text.split(marker)[1:]]
    if not blocks:
        raise ConfigError(f"identities.client_crl: {path} holds no PEM CRL")
    for block in blocks:
        try:
            crl = x509.load_pem_x509_crl(block)
        except ValueError:
            raise ConfigError(
                f"identities.client_crl: {path} holds a CRL that cannot be read"
            ) from None
        issuer = next(
            (
                ca
                for ca in cas
                if ca.subject == crl.issuer
                and crl.is_signature_valid(
                    ca.public_key()  # type: ignore[arg-type]
                )
            ),
            None,
        )
        if issuer is None:
            raise ConfigError(
                f"identities.client_crl: the CRL of {crl.issuer.rfc4514_string()} in {path} "
                "is not signed by a CA in server.tls.client_ca"
            )
        yield issuer, crl
