"""CI OIDC bearer tokens, verified against a test issuer's own keys and JWKS file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.errors import TokenUnavailable, Unauthenticated
from server.identity.model import OidcIssuer
from server.identity.oidc import JwksCache, TokenVerifier
from tests.harness.identity import TokenIssuer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def issuer() -> TokenIssuer:
    return TokenIssuer()


def _config(issuer: TokenIssuer, jwks: Path, **kw: float) -> OidcIssuer:
    jwks.write_text(json.dumps(issuer.jwks()))
    return OidcIssuer(
        name="ci",
        issuer=issuer.iss,
        audience=issuer.audience,
        jwks_file=jwks,
        jwks_url=None,
        **kw,
    )


def test_a_good_token_gives_an_identity_with_its_claims(
    issuer: TokenIssuer, tmp_path: Path
) -> None:
    verifier = TokenVerifier([_config(issuer, tmp_path / "jwks.json")])
    for alg in ("RS256", "ES256"):
        identity = verifier.identify(issuer.token(alg=alg))
        assert (identity.kind, identity.name, identity.issuer) == ("oidc", "ci", issuer.iss)
        assert identity.subject == "repo:acme/app:ref:refs/heads/main"
        assert identity.claims["repository"] == "acme/app"
        assert identity.claims["environment"] == "release"


def test_every_bad_token_is_unauthenticated(issuer: TokenIssuer, tmp_path: Path) -> None:
    verifier = TokenVerifier([_config(issuer, tmp_path / "jwks.json")])
    other = TokenIssuer()
    now = int(issuer.claims()["iat"])  # type: ignore[call-overload]
    cases = {
        "expired": (issuer.token(exp=now - 3600, iat=now - 7200, nbf=now - 7200), "expired"),
        "not yet valid": (issuer.token(nbf=now + 3600), "not valid yet"),
        "wrong audience": (issuer.token(aud="someone-else"), "audience"),
        "wrong issuer": (issuer.token(iss="https://evil.example.org"), "issuer"),
        "alg none": (issuer.unsigned_token(), "'none' is not accepted"),
        "HS256 with the public key": (issuer.hs256_with_public_key(), "'HS256' is not accepted"),
        "unknown kid": (issuer.token(kid="rsa-9"), "does not publish"),
        "signed by another key": (other.token(iss=issuer.iss), "does not verify"),
        "RS256 header on the EC key": (issuer.token(alg="RS256", kid="ec-1"), "not a RS256 key"),
        "no exp": (issuer.token(exp=None), "'exp'"),
        "no sub": (issuer.token(sub=None), "'sub'"),
        "garbage": ("not.a.jwt", "well-formed"),
    }
    for case, (token, message) in cases.items():
        with pytest.raises(Unauthenticated) as e:
            verifier.identify(token)
        assert message in str(e.value), case
        assert token not in str(e.value)


def test_leeway_admits_small_clock_skew_only(issuer: TokenIssuer, tmp_path: Path) -> None:
    verifier = TokenVerifier([_config(issuer, tmp_path / "jwks.json", leeway_seconds=60)])
    now = int(issuer.claims()["iat"])  # type: ignore[call-overload]
    verifier.identify(issuer.token(exp=now - 20, iat=now - 300, nbf=now - 300))
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.identify(issuer.token(exp=now - 120, iat=now - 300, nbf=now - 300))


def test_jwks_refresh_on_unknown_kid_at_most_once_per_interval(
    issuer: TokenIssuer, tmp_path: Path
) -> None:
    clock = Clock()
    jwks = tmp_path / "jwks.json"
    cache = JwksCache(_config(issuer, jwks, jwks_refresh_seconds=300), clock)
    cache.key("rsa-1")
    # The issuer rotates: a new kid appears. Fetched at once... but only once per interval.
    jwks.write_text(json.dumps(issuer.jwks(rsa_kid="rsa-2")))
    clock.now += 301
    assert cache.key("rsa-2").key_id == "rsa-2"
    jwks.write_text(json.dumps(issuer.jwks(rsa_kid="rsa-3")))
    clock.now += 10
    with pytest.raises(Unauthenticated):
        cache.key("rsa-3")  # not fetched again so soon: an unknown kid cannot flood the issuer
    clock.now += 300
    assert cache.key("rsa-3").key_id == "rsa-3"


def test_jwks_failure_keeps_the_last_good_one_then_unavailable(
    issuer: TokenIssuer, tmp_path: Path
) -> None:
    clock = Clock()
    jwks = tmp_path / "jwks.json"
    cache = JwksCache(
        _config(issuer, jwks, jwks_refresh_seconds=60, jwks_max_stale_seconds=600), clock
    )
    cache.key("rsa-1")
    jwks.write_text("{ not json")
    clock.now += 120
    assert cache.key("rsa-1").key_id == "rsa-1"  # refresh failed: the last good JWKS serves
    clock.now += 600
    with pytest.raises(TokenUnavailable, match="retry"):
        cache.key("rsa-1")


def test_never_fetched_is_unavailable(issuer: TokenIssuer, tmp_path: Path) -> None:
    cache = JwksCache(
        OidcIssuer("ci", issuer.iss, "hsmsign", tmp_path / "missing.json", None), Clock()
    )
    with pytest.raises(TokenUnavailable):
        cache.key("rsa-1")


def test_jwks_from_a_url(issuer: TokenIssuer) -> None:
    """The JWKS served over HTTP on loopback (https in production; http only to loopback)."""
    import http.server
    import threading

    body = json.dumps(issuer.jwks()).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks"
        verifier = TokenVerifier([OidcIssuer("ci", issuer.iss, issuer.audience, None, url)])
        assert verifier.identify(issuer.token(alg="ES256")).name == "ci"
    finally:
        server.shutdown()
