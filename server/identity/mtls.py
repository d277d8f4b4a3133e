"""Identities from verified client certificates.

gRPC has verified the chain against ``server.tls.client_ca`` before a call arrives; this
module takes the leaf (``x509_pem_cert``) and the intermediates the client presented
(``x509_pem_cert_chain``), builds the leaf's path to a client CA, refuses it when a CRL of
any CA on that path lists the certificate below it, and applies the typed rules: each rule
matches one field only (a URI SAN, a DNS SAN, an email SAN or the subject CN) of a leaf whose
path passes through the rule's own CA. A rule may name the root (what any of its
intermediates issued) or an intermediate (only what that one issued); an intermediate a rule
names must itself be issued, directly or through others in the rule's file, by a client CA.
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


#: The longest path from a leaf to a client CA that is followed (RFC 5280 sets no bound;
#: enterprise PKIs use one or two intermediates).
MAX_PATH_LENGTH = 8


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _path(
    cert: x509.Certificate, pool: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> list[x509.Certificate] | None:
    """The CAs from ``cert``'s issuer up to one of ``anchors``, each signed by the next, taken
    from ``pool`` and ``anchors``; None when there is no such path."""
    path: list[x509.Certificate] = []
    current = cert
    while len(path) < MAX_PATH_LENGTH:
        if current in anchors and path:
            return path
        issuer = next(
            (
                ca
                for ca in (*anchors, *pool)
                if ca.subject == current.issuer and ca not in path and _signed_by(current, ca)
            ),
            None,
        )
        if issuer is None:
            return None
        path.append(issuer)
        current = issuer
        if current in anchors:
            return path
    return None


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
        #: Intermediates named by rules, with the CAs above them in the rules' files.
        self._intermediates: list[x509.Certificate] = []
        for rule in rules:
            certs = _load_certs(rule.ca, f"identities.mtls {rule.name!r}: ca")
            for ca in certs:
                if ca not in trusted:
                    if _path(ca, certs, trusted) is None:
                        raise ConfigError(
                            f"identities.mtls {rule.name!r}: ca {rule.ca} is neither in "
                            "server.tls.client_ca nor issued by a CA in it, so no certificate "
                            "it issued can connect"
                        )
                    self._intermediates.append(ca)
                self._rules.append(_BoundRule(rule, ca))
        self._cas = trusted
        self._crls: list[tuple[x509.Certificate, x509.CertificateRevocationList]] = []
        if crl is not None:
            self._crls = list(_load_crls(crl, [*trusted, *self._intermediates]))

    def identify(self, pem: bytes, chain: Sequence[bytes] = ()) -> Identity | None:
        """The identity of a verified client certificate (``chain``: the PEM intermediates
        the client presented); None when no rule names it. Raises Unauthenticated when the
        certificate or a CA on its path is revoked, or its path leads to no client CA."""
        try:
            leaf = x509.load_pem_x509_certificate(pem)
            presented = [c for blob in chain for c in x509.load_pem_x509_certificates(blob)]
        except ValueError:
            raise Unauthenticated("the client certificate cannot be read") from None
        path = _path(leaf, [*presented, *self._intermediates], self._cas)
        if path is None:
            raise Unauthenticated("the client certificate's chain leads to no client CA")
        for below, issuer in zip([leaf, *path], path, strict=False):
            for ca, crl in self._crls:
                if ca == issuer and crl.get_revoked_certificate_by_serial_number(
                    below.serial_number
                ):
                    what = (
                        "the client certificate"
                        if below is leaf
                        else f"the client certificate's CA {below.subject.rfc4514_string()}"
                    )
                    raise Unauthenticated(f"{what} (serial {below.serial_number:x}) is revoked")
        for bound in self._rules:
            if bound.ca in path and bound.rule.value in field_values(leaf, bound.rule.field):
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
                "is not signed by a CA in server.tls.client_ca or one a rule names"
            )
        yield issuer, crl
