"""TLS certificates made by the test: a CA, server and client certificates (EC P-256), and
the [server.tls] table that points a daemon config at them."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_cert(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Name | None = None,
    ca: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new key and a certificate for ``subject`` (CN), valid for a day, signed by
    ``issuer_key`` (self-signed without one). A leaf is for localhost and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, b.sign(issuer_key or key, hashes.SHA256())


def write_key_and_cert(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    """``path``.key (PKCS#8 PEM, mode 0600) and ``path``.crt (PEM)."""
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path.with_suffix(".key"), 0o600)
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


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
    ca_key, ca = make_cert("hsmsign test CA", ca=True)
    write_key_and_cert(tmp_path / "ca", ca_key, ca)
    for name in ("server", "client"):
        write_key_and_cert(tmp_path / name, *make_cert("localhost", ca_key, ca.subject))
    write_key_and_cert(tmp_path / "other", *make_cert("someone else's CA", ca=True))
