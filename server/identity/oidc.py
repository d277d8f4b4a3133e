"""Identities from CI OIDC ID tokens (GitHub Actions, GitLab CI): ``authorization: Bearer``.

Verified with PyJWT: the signature (RS256 or ES256 only, with a key of the matching type from
the issuer's JWKS), ``iss``, ``aud``, ``exp``, ``nbf`` and ``iat`` (with the issuer's leeway).

JWKS: read from a file or fetched from an https URL, cached for ``jwks_refresh_seconds``;
a ``kid`` not in the cache fetches again at once, at most once per that interval. When a
fetch fails the last good JWKS stays in use until it is ``jwks_max_stale_seconds`` old; after
that (or when none was ever fetched) token calls get UNAVAILABLE (the daemon cannot check
tokens now; retry), never a silent accept.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jwt

from server.errors import TokenUnavailable, Unauthenticated
from server.identity.model import Identity, OidcIssuer

log = logging.getLogger(__name__)

#: The only signature algorithms accepted: what GitHub and GitLab sign with, and never
#: ``none`` or an HMAC (which a public key could be made to "verify").
ALGORITHMS = ("RS256", "ES256")
#: The JWK key type each algorithm needs.
_KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
#: Seconds a JWKS fetch may take.
FETCH_TIMEOUT_SECONDS = 5.0
#: A JWKS larger than this is refused (a JWKS is a few kilobytes).
MAX_JWKS_BYTES = 1 << 20


def _fetch_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_SECONDS) as r:  # noqa: S310 (https checked at load)
        body: bytes = r.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError("JWKS larger than 1 MiB")
    return body


class JwksCache:
    """One issuer's signing keys, by ``kid``; thread-safe."""

    def __init__(self, issuer: OidcIssuer, clock: Callable[[], float] = time.monotonic) -> None:
        self._issuer = issuer
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # of the last good JWKS
        self._tried_at: float | None = None

    def _read(self) -> bytes:
        if self._issuer.jwks_file is not None:
            return self._issuer.jwks_file.read_bytes()
        return _fetch_url(str(self._issuer.jwks_url))

    def _refresh(self, now: float) -> None:
        self._tried_at = now
        try:
            document = json.loads(self._read())
            keys: dict[str, jwt.PyJWK] = {}
            for jwk in document["keys"]:
                if jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC"):
                    continue
                try:
                    keys[str(jwk.get("kid", ""))] = jwt.PyJWK(jwk)
                except jwt.PyJWKError:
                    continue  # a key type or curve PyJWT cannot use: not one we accept
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(
                "JWKS of issuer %r could not be read (%s); keeping the last good one",
                self._issuer.name,
                type(e).__name__,
            )
            return
        self._keys, self._fetched_at = keys, now

    def key(self, kid: str) -> jwt.PyJWK:
        """The signing key ``kid``. Raises Unauthenticated for a kid the issuer does not
        publish, TokenUnavailable when no JWKS fresh enough is at hand."""
        issuer = self._issuer
        with self._lock:
            now = self._clock()
            due = self._fetched_at is None or now - self._fetched_at >= issuer.jwks_refresh_seconds
            may_try = self._tried_at is None or now - self._tried_at >= issuer.jwks_refresh_seconds
            if (due or kid not in self._keys) and may_try:
                self._refresh(now)
            if self._fetched_at is None or now - self._fetched_at > issuer.jwks_max_stale_seconds:
                raise TokenUnavailable(
                    f"the signing keys of token issuer {issuer.name!r} cannot be fetched now; "
                    "retry later"
                )
            found = self._keys.get(kid)
        if found is None:
            raise Unauthenticated(
                f"token signed with a key issuer {issuer.name!r} does not publish"
            )
        return found


def _claims_as_strings(claims: Mapping[str, Any]) -> Mapping[str, str]:
    out: dict[str, str] = {}
    for k, v in claims.items():
        if isinstance(v, bool):
            out[k] = "true" if v else "false"
        elif isinstance(v, str | int | float):
            out[k] = str(v)
    return MappingProxyType(out)


class TokenVerifier:
    """Verifies bearer tokens of the configured issuers."""

    def __init__(
        self, issuers: Sequence[OidcIssuer], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._issuers = {i.issuer: (i, JwksCache(i, clock)) for i in issuers}

    def __bool__(self) -> bool:
        return bool(self._issuers)

    def identify(self, token: str) -> Identity:
        """The identity a token proves. Raises Unauthenticated for every token that does not
        verify (the message says which check failed, never the token), TokenUnavailable when
        the issuer's keys cannot be had."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise Unauthenticated("the bearer token is not a well-formed JWT") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise Unauthenticated(
                f"token algorithm {str(alg)[:20]!r} is not accepted; allowed: "
                + ", ".join(ALGORITHMS)
            )
        iss = unverified.get("iss")
        found = self._issuers.get(iss) if isinstance(iss, str) else None
        if found is None:
            raise Unauthenticated("the token's issuer is not configured in [[identities.oidc]]")
        issuer, jwks = found
        key = jwks.key(str(header.get("kid", "")))
        if key.key_type != _KEY_TYPES[alg] or key.algorithm_name != alg:
            raise Unauthenticated(f"token key {header.get('kid')!r} is not a {alg} key")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=issuer.leeway_seconds,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(f"the token's audience is not {issuer.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("the token's issuer does not match") from None
        except jwt.MissingRequiredClaimError as e:
            raise Unauthenticated(f"the token has no {e.claim!r} claim") from None
        except jwt.PyJWTError:
            raise Unauthenticated("the token's signature does not verify") from None
        return Identity(
            kind="oidc",
            name=issuer.name,
            subject=str(claims["sub"]),
            issuer=issuer.issuer,
            claims=_claims_as_strings(claims),
        )
