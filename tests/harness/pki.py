"""The test PKI: CAs, leaf certificates with chosen names, CRLs, and the daemon's TLS files.

One implementation for every test that needs certificates (TLS, mTLS identities): everything
is made here with cryptography (EC P-256, short lifetimes); nothing is read from disk. Files
are written PEM, keys 0600, the way the daemon and the client read them.
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

    def write(self, stem: Path, chain: tuple[Issued, ...] = ()) -> tuple[Path, Path]:
        """Writes STEM.crt (followed by the ``chain`` certificates, leaf first, the way a
        client presents intermediates) and STEM.key (0600); returns their paths."""
        crt, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        crt.write_bytes(self.cert_pem + b"".join(c.cert_pem for c in chain))
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


def make_ca(name: str, issuer: Issued | None = None) -> Issued:
    """A CA certificate for ``name`` (CN), valid for a day: self-signed, or an intermediate
    signed by ``issuer``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(issuer.key if issuer else key, hashes.SHA256())
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


def add_server_tls(cfg: Path, tmp_path: Path, extra: str = "") -> Path:
    """Adds [server.tls] to ``cfg``: tmp_path's server.crt/.key, and ca.crt as client_ca."""
    cfg.write_text(
        cfg.read_text()
        + f"""
[server.tls]
cert = "{tmp_path / "server.crt"}"
key = "{tmp_path / "server.key"}"
client_ca = "{tmp_path / "ca.crt"}"
{extra}"""
    )
    return cfg


def write_tls_files(tmp_path: Path) -> None:
    """ca.crt/.key, server.crt/.key, client.crt/.key (one CA), other.crt/.key (another CA)."""
    ca = make_ca("hsmsign test CA")
    ca.write(tmp_path / "ca")
    for name in ("server", "client"):
        make_leaf(ca, "localhost", server=True).write(tmp_path / name)
    make_ca("someone else's CA").write(tmp_path / "other")
