"""Reads ``[identities]`` and ``[policy]`` of the daemon's config into frozen dataclasses.

Called by ``server.config.load`` with the raw TOML document; errors are ConfigError naming
the file, the key and what is allowed, like the rest of the config. ``[policy] file = ...``
reads the grants and limits from a file of their own (same keys, at its top level).
"""

from __future__ import annotations

import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from server.identity.model import (
    CERT_FIELDS,
    CertField,
    CertRule,
    IdentityConfig,
    LocalIdentity,
    OidcIssuer,
)
from server.policy.model import ALL_OPERATIONS, Grant, Limit, Operation, Policy
from server.tomltable import Table

#: The top-level tables read here.
TABLES = frozenset({"identities", "policy"})


@dataclass(frozen=True)
class AccessConfig:
    """Who callers are and what they may do. The default identifies nobody and grants
    nothing."""

    identities: IdentityConfig = field(default_factory=IdentityConfig)
    policy: Policy = field(default_factory=Policy)


def _cert_rule(t: Table) -> CertRule:
    name = t.text("name", "the identity name grants refer to")
    ca = t.path_value("ca")
    if ca is None:
        raise t.error("ca", "is required: the CA certificate (PEM) that issues these clients")
    given: list[tuple[CertField, str]] = []
    for f in CERT_FIELDS:
        value = t.get(f, str, None, "the exact value of that certificate field")
        if value is not None:
            given.append((f, value))
    if len(given) != 1 or not given[0][1]:
        raise t.error(
            "subject_cn", "exactly one of uri_san, dns_san, email_san, subject_cn is required"
        )
    t.finish()
    return CertRule(name=name, field=given[0][0], value=given[0][1], ca=ca)


def _oidc_issuer(t: Table) -> OidcIssuer:
    name = t.text("name", "the identity name grants refer to")
    issuer = t.text("issuer", "the exact iss claim, an https URL")
    audience = t.text("audience", "the aud claim tokens must carry")
    jwks_file = t.path_value("jwks_file")
    jwks_url = t.get("jwks_url", str, None, "an https URL")
    if (jwks_file is None) == (jwks_url is None):
        raise t.error("jwks_url", "exactly one of jwks_url and jwks_file is required")
    if jwks_url is not None:
        url = urllib.parse.urlsplit(jwks_url)
        loopback = url.hostname in ("127.0.0.1", "::1", "localhost")
        if url.scheme != "https" and not (url.scheme == "http" and loopback):
            raise t.error("jwks_url", f"got {jwks_url!r}; allowed: an https URL")
    out = OidcIssuer(
        name=name,
        issuer=issuer,
        audience=audience,
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        leeway_seconds=t.get("leeway_seconds", float, 60.0, "seconds, 0 to 300"),
        jwks_refresh_seconds=t.number("jwks_refresh_seconds", 300.0, "seconds above 0") or 300.0,
        jwks_max_stale_seconds=t.number("jwks_max_stale_seconds", 3600.0, "seconds above 0")
        or 3600.0,
    )
    if not 0 <= out.leeway_seconds <= 300:
        raise t.error("leeway_seconds", f"got {out.leeway_seconds!r}; allowed: 0 to 300 seconds")
    t.finish()
    return out


def _identities(root: Table) -> IdentityConfig:
    t = root.table("identities")
    local = t.table("local")
    enabled = local.get("enabled", bool, False, "true or false")
    local.finish()
    mtls = tuple(_cert_rule(r) for r in t.tables("mtls"))
    oidc = tuple(_oidc_issuer(r) for r in t.tables("oidc"))
    names = [r.name for r in mtls] + [i.name for i in oidc] + ["local"]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise t.error("mtls", f"identity name {duplicate!r} is used twice (or is 'local')")
    crl = t.path_value("client_crl")
    t.finish()
    return IdentityConfig(mtls=mtls, oidc=oidc, local=LocalIdentity(enabled), client_crl=crl)


def _operations(t: Table) -> frozenset[Operation]:
    allowed = '"*" or ' + ", ".join(o.value for o in Operation)
    names = t.strings("operations", allowed)
    if "*" in names:
        return ALL_OPERATIONS
    try:
        return frozenset(Operation(n) for n in names)
    except ValueError:
        bad = next(n for n in names if n not in {o.value for o in Operation})
        raise t.error("operations", f"got {bad!r}; allowed: {allowed}") from None


def _grant(t: Table) -> Grant:
    identities = t.strings("identities", 'identity names, or "*" for any identity')
    keys = t.strings("keys", 'key names or globs such as "release-*"')
    operations = _operations(t)
    claims_t = t.table("claims")
    claims: dict[str, str] = {}
    for k in list(claims_t.data):
        claims[k] = claims_t.text(k, "the claim's value or a glob")
    claims_t.finish()
    t.finish()
    return Grant(identities, keys, operations, MappingProxyType(claims))


def _limit(t: Table) -> Limit:
    rate = t.number("rate", None, "calls per second above 0")
    burst = t.number("burst", None, "calls above 0")
    concurrent = t.get("concurrent", int, None, "a number of calls from 1")
    if concurrent is not None and concurrent < 1:
        raise t.error("concurrent", f"got {concurrent!r}; allowed: a number of calls from 1")
    if burst is not None and rate is None:
        raise t.error("burst", "goes with rate")
    t.finish()
    return Limit(rate=rate, burst=burst, concurrent=concurrent)


def _policy(root: Table) -> Policy:
    t = root.table("policy")
    file = t.path_value("file")
    if file is not None:
        if set(t.data) - {"file"}:
            raise t.error("file", "give either file or grants and limits here, not both")
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as e:
            raise t.error("file", f"cannot read {file}: {e.strerror}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise t.error("file", f"{file} is not valid TOML: {e}") from None
        t = Table(file, "policy", raw)
    grants = tuple(_grant(g) for g in t.tables("grant"))
    default = _limit(t.table("default_limit"))
    limits_t = t.table("limits")
    limits = {name: _limit(limits_t.table(name)) for name in list(limits_t.data)}
    limits_t.finish()
    t.finish()
    return Policy(grants, default, MappingProxyType(limits))


def load_access(path: Path, raw: Mapping[str, Any]) -> AccessConfig:
    """``[identities]`` and ``[policy]`` of the config document ``raw`` (read from ``path``).
    Raises ConfigError naming the file and key."""
    root = Table(path, "", dict(raw))
    identities = _identities(root)
    policy = _policy(root)
    return AccessConfig(identities, policy)
