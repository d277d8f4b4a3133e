"""The server's TLS files: read and checked once per start or reload, and handed to gRPC
through credentials whose certificate can be swapped for new handshakes (SIGHUP,
``server.reload``) while the connections already open keep theirs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import grpc

from hsmsign import tlsfiles
from server.config import Config
from server.errors import ConfigError


@dataclass(frozen=True)
class TlsMaterial:
    """The bytes of [server.tls]'s files, checked to belong together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None

    def certificate_configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca
        )


def read_tls(cfg: Config) -> TlsMaterial | None:
    """[server.tls]'s files (None: plaintext). Raises ConfigError for a TLS file that cannot
    be read or does not match the others."""
    tls = cfg.server.tls
    if tls is None:
        return None
    try:
        cert, key = tls.cert.read_bytes(), tls.key.read_bytes()
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as e:
        raise ConfigError(
            f"{cfg.path}: server.tls: cannot read {e.filename}: {e.strerror}"
        ) from None
    problem = tlsfiles.problem(
        ca,
        cert,
        key,
        ca_name=f"client_ca {tls.client_ca}",
        cert_name=f"cert {tls.cert}",
        key_name=f"key {tls.key}",
    )
    if problem:
        raise ConfigError(f"{cfg.path}: server.tls: {problem}")
    return TlsMaterial(cert, key, ca)


class CertificateSwitch:
    """What gRPC asks before each new TLS handshake: a new certificate configuration once
    after a reload offered one, None (keep the current one) otherwise."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def offer(self, material: TlsMaterial) -> None:
        with self._lock:
            self._pending = material.certificate_configuration()

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


#: This process's switch: the credentials below consult it, ``server.reload`` offers to it.
certificates = CertificateSwitch()


def credentials(material: TlsMaterial | None) -> grpc.ServerCredentials | None:
    """Server credentials for ``material`` (None: plaintext) that take a certificate offered
    to ``certificates`` for every later handshake. A client certificate is required when a
    client CA is configured."""
    if material is None:
        return None
    return grpc.dynamic_ssl_server_credentials(
        material.certificate_configuration(),
        # gRPC documents None as "keep the current configuration"; its stubs omit None.
        cast(Callable[[], grpc.ServerCertificateConfiguration], certificates.fetch),
        require_client_authentication=material.client_ca is not None,
    )
