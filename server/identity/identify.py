"""Which identity a call has: a bearer token, else a client certificate matching a rule,
else (development config) the local caller. A credential that is presented but does not
verify is refused; it never falls back to a weaker one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import cast

import grpc

from server.errors import Unauthenticated
from server.identity.local import admin_socket_identity, is_local_peer, local_identity
from server.identity.model import Identity, IdentityConfig
from server.identity.mtls import CertificateIdentifier
from server.identity.oidc import TokenVerifier


def _auth_values(context: grpc.ServicerContext, key: str) -> list[bytes]:
    # grpc's auth context maps a property name to a list of bytes values.
    return list(cast(Iterable[bytes], context.auth_context().get(key, ())))


class Identifier:
    """Identifies callers as ``[identities]`` says."""

    def __init__(
        self, config: IdentityConfig, client_ca: Path | None, admin_socket: str | None = None
    ) -> None:
        """``admin_socket``: ``server.admin_listen`` (its callers are ``admin-socket``).
        Raises ConfigError for unreadable or inconsistent certificate files."""
        self._admin_socket = admin_socket
        self._local = config.local.enabled
        self._certificates = CertificateIdentifier(config.mtls, client_ca, config.client_crl)
        self._tokens = TokenVerifier(config.oidc)

    def identify(self, context: grpc.ServicerContext) -> Identity:
        """The caller's identity. Raises Unauthenticated (no usable credential) or
        TokenUnavailable (a token issuer's keys cannot be fetched now)."""
        peer = context.peer()
        if self._admin_socket is not None and peer.startswith("unix"):
            return admin_socket_identity(self._admin_socket)
        tls = b"ssl" in _auth_values(context, "transport_security_type")
        bearer = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if bearer:
            if len(bearer) > 1:
                raise Unauthenticated("more than one authorization header")
            scheme, _, token = str(bearer[0]).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization header must be 'Bearer <token>'")
            if not tls and not (self._local and is_local_peer(peer)):
                raise Unauthenticated("bearer tokens are accepted only over TLS")
            if not self._tokens:
                raise Unauthenticated("this daemon accepts no bearer tokens ([[identities.oidc]])")
            return self._tokens.identify(token.strip())
        pems = _auth_values(context, "x509_pem_cert")
        if pems:
            found = self._certificates.identify(
                pems[0], _auth_values(context, "x509_pem_cert_chain")
            )
            if found is not None:
                return found
        if self._local and is_local_peer(peer):
            return local_identity(peer)
        if pems:
            raise Unauthenticated("the client certificate matches no [[identities.mtls]] rule")
        raise Unauthenticated(
            "no credentials: present a client certificate or an 'authorization: Bearer' token"
        )
