"""The identity of a caller, and the config that says how callers are identified."""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

IdentityKind = Literal["mtls", "oidc", "local", "socket"]
#: The certificate field an mTLS rule matches, and only that field.
CertField = Literal["uri_san", "dns_san", "email_san", "subject_cn"]
CERT_FIELDS: tuple[CertField, ...] = ("uri_san", "dns_san", "email_san", "subject_cn")


@dataclass(frozen=True)
class Identity:
    """Who called, as the policy sees it (also what the audit log records).

    ``name`` is what ``[[policy.grant]] identities`` refer to: the name of the mTLS rule or
    OIDC issuer that admitted the caller, or ``local``. ``subject`` is what that rule matched:
    the certificate field's value, the token's ``sub`` claim, or the peer address.
    """

    kind: IdentityKind
    name: str
    subject: str
    #: The issuing CA's subject (RFC 4514) for mtls, the token's ``iss`` for oidc.
    issuer: str | None = None
    #: The token's claims with string, number or boolean values (as strings); empty for mtls
    #: and local.
    claims: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def describe(self) -> str:
        """How messages name the caller: kind, name and subject; never a secret."""
        return f"{self.kind} identity {self.name!r} ({self.subject})"

    @property
    def limit_key(self) -> str:
        """Callers sharing this key share their rate and concurrency limits."""
        return f"{self.kind}\0{self.name}\0{self.subject}"


@dataclass(frozen=True)
class CertRule:
    """``[[identities.mtls]]``: a certificate issued by ``ca`` whose ``field`` holds ``value``
    exactly is the identity ``name``."""

    name: str
    field: CertField
    value: str
    #: The CA certificate (PEM) that must have signed the client certificate directly; it
    #: must also be in ``server.tls.client_ca`` (the handshake's trust list).
    ca: Path


@dataclass(frozen=True)
class OidcIssuer:
    """``[[identities.oidc]]``: an OIDC issuer whose ID tokens are accepted as bearer tokens."""

    #: The identity name grants refer to (e.g. "github", "gitlab").
    name: str
    #: The exact ``iss`` claim (e.g. https://token.actions.githubusercontent.com).
    issuer: str
    #: The ``aud`` the token must carry (the value CI jobs request, e.g. "hsmsign").
    audience: str
    #: Where the issuer's signing keys (a JWKS document) come from: a file or an https URL.
    jwks_file: Path | None
    jwks_url: str | None
    #: Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    leeway_seconds: float = 60.0
    #: A JWKS is used for this long before it is fetched again; an unknown ``kid`` fetches
    #: at once, but at most once per this interval.
    jwks_refresh_seconds: float = 300.0
    #: When fetching fails, the last good JWKS keeps being used for this long after it was
    #: fetched; past that, token calls get UNAVAILABLE until a fetch succeeds.
    jwks_max_stale_seconds: float = 3600.0


@dataclass(frozen=True)
class LocalIdentity:
    """``[identities.local]``: the development identity for callers on this host."""

    #: Callers from a loopback address or a unix socket that present no token and no
    #: certificate matching a rule are the identity ``local``. Also allows serving
    #: without TLS (on a loopback address or a unix socket only) and tokens over it.
    enabled: bool = False


@dataclass(frozen=True)
class IdentityConfig:
    """``[identities]``: how callers are identified. Nothing configured identifies nobody."""

    mtls: tuple[CertRule, ...] = ()
    oidc: tuple[OidcIssuer, ...] = ()
    local: LocalIdentity = LocalIdentity()
    #: A PEM file of CRLs for client certificates (each signed by a client CA).
    client_crl: Path | None = None


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "hsmsign_identity", default=None
)


def current_identity() -> Identity | None:
    """The identity of the call being served in this thread: set by the call pipeline once
    the caller is identified, None from the start of a call until then (and for a call
    refused as UNAUTHENTICATED). Kept after the handler returns, until the next call."""
    return _current.get()


def set_current_identity(identity: Identity | None) -> contextvars.Token[Identity | None]:
    return _current.set(identity)
