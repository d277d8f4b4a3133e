"""CI OIDC tokens against a real daemon over TLS; what a plaintext listener may be."""

from __future__ import annotations

import json
from pathlib import Path

import grpc

from tests.conftest import TokenDir, hsmsignd, start_daemon, write_config
from tests.harness.calls import sign_status
from tests.harness.identity import TokenIssuer
from tests.harness.pki import make_ca, make_leaf

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED

POLICY = """
[[identities.oidc]]
name = "ci"
issuer = "{iss}"
audience = "hsmsign"
jwks_file = "{jwks}"
[[policy.grant]]
identities = ["ci"]
claims = {{ repository = "acme/app", ref = "refs/heads/*" }}
keys = ["demo"]
operations = ["sign_digest"]
"""


def _sign(channel: grpc.Channel, token: str | None) -> tuple[grpc.StatusCode, str]:
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else None
    return sign_status(channel, metadata=metadata)


def test_tokens_over_tls(token: TokenDir, tmp_path: Path) -> None:
    issuer = TokenIssuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    ca = make_ca("server CA")
    ca_crt, _ = ca.write(tmp_path / "ca")
    crt, key = make_leaf(ca, "localhost", server=True).write(tmp_path / "server")
    cfg = write_config(tmp_path / "c.toml", token, policy=POLICY.format(iss=issuer.iss, jwks=jwks))
    cfg.write_text(cfg.read_text() + f'\n[server.tls]\ncert = "{crt}"\nkey = "{key}"\n')
    d = start_daemon(cfg, tmp_path / "d")
    now = int(issuer.claims()["iat"])  # type: ignore[call-overload]
    cases = [
        ("good RS256", issuer.token(), OK),
        ("good ES256", issuer.token(alg="ES256"), OK),
        ("another branch", issuer.token(ref="refs/heads/dev"), OK),
        ("a tag", issuer.token(ref="refs/tags/v1"), DENIED),
        ("another repository", issuer.token(repository="acme/other"), DENIED),
        ("expired", issuer.token(exp=now - 3600, iat=now - 7200, nbf=now - 7200), UNAUTH),
        ("wrong audience", issuer.token(aud="other"), UNAUTH),
        ("wrong issuer", issuer.token(iss="https://evil.example.org"), UNAUTH),
        ("alg none", issuer.unsigned_token(), UNAUTH),
        ("HS256 with the public key", issuer.hs256_with_public_key(), UNAUTH),
        ("unknown kid", issuer.token(kid="nope"), UNAUTH),
        ("no token", None, UNAUTH),
    ]
    try:
        creds = grpc.ssl_channel_credentials(ca_crt.read_bytes())
        with grpc.secure_channel(d.address, creds) as ch:
            seen = {name: _sign(ch, t) for name, t, _ in cases}
    finally:
        d.stop()
    for name, _, expected in cases:
        assert seen[name][0] == expected, (name, seen[name])
    assert "may not sign_digest key 'demo'" in seen["a tag"][1]
    assert "oidc identity 'ci'" in seen["a tag"][1]


def test_plaintext_only_on_loopback_and_only_when_the_config_says_so(
    token: TokenDir, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.toml", token, policy="")
    r = hsmsignd(cfg, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "serving without TLS needs [identities.local] enabled = true" in r.stderr
    cfg = write_config(tmp_path / "c.toml", token)  # the local development identity
    r = hsmsignd(cfg, "serve", "--listen", "0.0.0.0:0", check=False, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "refusing to serve without TLS on 0.0.0.0:0" in r.stderr


def test_token_over_plaintext_loopback_in_the_development_config(
    token: TokenDir, tmp_path: Path
) -> None:
    issuer = TokenIssuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    policy = "[identities.local]\nenabled = true\n" + POLICY.format(iss=issuer.iss, jwks=jwks)
    d = start_daemon(write_config(tmp_path / "c.toml", token, policy=policy), tmp_path / "d")
    try:
        with grpc.insecure_channel(d.address) as ch:
            assert _sign(ch, issuer.token()) == (OK, "")
            # No token: the local identity, which this policy grants nothing.
            code, details = _sign(ch, None)
            assert code == DENIED and "local identity 'local'" in details
            # A token that does not verify never falls back to the local identity.
            assert _sign(ch, issuer.token(aud="other"))[0] == UNAUTH
    finally:
        d.stop()
