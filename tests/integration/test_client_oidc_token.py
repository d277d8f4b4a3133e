"""The hsmsign CLI sends a CI job's OIDC ID token (--oidc-token-file, HSMSIGN_OIDC_TOKEN_FILE,
HSMSIGN_OIDC_TOKEN) to a real daemon whose policy grants only that identity, never over
plaintext to another machine, and never shows the token."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import HSMSIGN, TokenDir, start_daemon, write_config
from tests.harness.identity import TokenIssuer
from tests.harness.pki import make_ca, make_leaf

POLICY = """
[[identities.oidc]]
name = "ci"
issuer = "{iss}"
audience = "hsmsign"
jwks_file = "{jwks}"
[[policy.grant]]
identities = ["ci"]
claims = {{ repository = "acme/app" }}
keys = ["demo"]
operations = ["get_public_key", "sign_digest"]
"""

_TOKEN_ENV = ("HSMSIGN_OIDC_TOKEN", "HSMSIGN_OIDC_TOKEN_FILE")


def _hsmsign(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in _TOKEN_ENV}
    return subprocess.run(
        [HSMSIGN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
    )


def _issuer(tmp_path: Path) -> tuple[TokenIssuer, str]:
    issuer = TokenIssuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    return issuer, POLICY.format(iss=issuer.iss, jwks=jwks)


def _no_token_in(r: subprocess.CompletedProcess[str], *tokens: str) -> None:
    for t in tokens:
        assert t not in r.stderr and t not in r.stdout
        # Nor a recognisable part of it (the signature is the secret-looking tail).
        assert t.rsplit(".", 1)[-1][:16] not in r.stderr + r.stdout


def test_token_over_tls_is_the_identity(token: TokenDir, tmp_path: Path) -> None:
    issuer, policy = _issuer(tmp_path)
    ca = make_ca("server CA")
    ca_crt, _ = ca.write(tmp_path / "ca")
    crt, key = make_leaf(ca, "localhost", server=True).write(tmp_path / "server")
    cfg = write_config(tmp_path / "c.toml", token, policy=policy)
    cfg.write_text(cfg.read_text() + f'\n[server.tls]\ncert = "{crt}"\nkey = "{key}"\n')
    good, wrong_aud = issuer.token(), issuer.token(aud="other")
    tok = tmp_path / "tok"
    tok.write_text(good + "\n")  # CI systems end the file with a newline
    bad = tmp_path / "bad"
    bad.write_text(wrong_aud)
    digest = tmp_path / "digest"
    digest.write_bytes(b"\x07" * 32)
    d = start_daemon(cfg, tmp_path / "d")
    try:
        tls = ("--server", d.address, "--tls-ca", str(ca_crt))
        r = _hsmsign(*tls, "--oidc-token-file", str(tok), "pubkey", "demo")
        assert r.returncode == 0 and "BEGIN PUBLIC KEY" in r.stdout, r.stderr
        r = _hsmsign(
            *tls, "--oidc-token-file", str(tok), "sign", "--key", "demo", "--file", str(digest)
        )
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        r = _hsmsign(*tls, "sign", "--key", "demo", "--file", str(digest))
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr
        r = _hsmsign(*tls, "pubkey", "demo", env={"HSMSIGN_OIDC_TOKEN_FILE": str(tok)})
        assert r.returncode == 0, r.stderr
        r = _hsmsign(*tls, "pubkey", "demo", env={"HSMSIGN_OIDC_TOKEN": good})
        assert r.returncode == 0, r.stderr
        # The flag wins over both variables; the file variable over the token variable.
        r = _hsmsign(
            *tls,
            "--oidc-token-file",
            str(tok),
            "pubkey",
            "demo",
            env={"HSMSIGN_OIDC_TOKEN_FILE": str(bad), "HSMSIGN_OIDC_TOKEN": wrong_aud},
        )
        assert r.returncode == 0, r.stderr
        r = _hsmsign(
            *tls,
            "pubkey",
            "demo",
            env={"HSMSIGN_OIDC_TOKEN_FILE": str(bad), "HSMSIGN_OIDC_TOKEN": good},
        )
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr
        _no_token_in(r, good, wrong_aud)

        r = _hsmsign(*tls, "pubkey", "demo")  # no token: nobody the policy knows
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr
        r = _hsmsign(*tls, "--oidc-token-file", str(bad), "pubkey", "demo")
        assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        _no_token_in(r, wrong_aud)
        other_repo = issuer.token(repository="acme/other")
        r = _hsmsign(*tls, "pubkey", "demo", env={"HSMSIGN_OIDC_TOKEN": other_repo})
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr, r.stderr
        _no_token_in(r, other_repo)
    finally:
        d.stop()


def test_token_over_plaintext_only_to_this_machine(token: TokenDir, tmp_path: Path) -> None:
    issuer, policy = _issuer(tmp_path)
    cfg = write_config(
        tmp_path / "c.toml", token, policy="[identities.local]\nenabled = true\n" + policy
    )
    good = issuer.token()
    tok = tmp_path / "tok"
    tok.write_text(good)
    d = start_daemon(cfg, tmp_path / "d")
    try:
        r = _hsmsign("--server", d.address, "--oidc-token-file", str(tok), "pubkey", "demo")
        assert r.returncode == 0 and "BEGIN PUBLIC KEY" in r.stdout, r.stderr
        r = _hsmsign("--server", d.address, "pubkey", "demo")  # the local identity: no grant
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr, r.stderr
        signed = tmp_path / "signed"
        signed.write_bytes(b"an artifact")
        sign = ("sign", "--key", "demo", "--file", str(signed))
        r = _hsmsign("--server", d.address, *sign, env={"HSMSIGN_OIDC_TOKEN": good})
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
        r = _hsmsign("--server", d.address, *sign)
        assert r.returncode == 1 and "PERMISSION_DENIED" in r.stderr, r.stderr
        _no_token_in(r, good)
    finally:
        d.stop()
    for server in ("10.20.30.40:50051", "hsm.example.com:443"):
        for insecure in ((), ("--insecure",)):
            r = _hsmsign(
                "--server", server, *insecure, "pubkey", "demo", env={"HSMSIGN_OIDC_TOKEN": good}
            )
            assert r.returncode == 2, r.stderr
            assert r.stderr.count("\n") == 1 and r.stderr.startswith("hsmsign: error: ")
            _no_token_in(r, good)
        r = _hsmsign("--server", server, "--insecure", "--oidc-token-file", str(tok), "pubkey", "x")
        assert r.returncode == 2 and "OIDC token over plaintext" in r.stderr, r.stderr
        _no_token_in(r, good)


def test_bad_token_files_are_one_line_usage_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    two = tmp_path / "two"
    two.write_text("a.b.c\nd.e.f\n")
    cases = [
        (("--oidc-token-file", str(tmp_path / "missing")), {}, "cannot read the OIDC token file"),
        (("--oidc-token-file", str(empty)), {}, "is empty"),
        (("--oidc-token-file", str(two)), {}, "more than one token"),
        ((), {"HSMSIGN_OIDC_TOKEN_FILE": str(tmp_path)}, "cannot read the OIDC token file"),
        ((), {"HSMSIGN_OIDC_TOKEN": "  "}, "HSMSIGN_OIDC_TOKEN is empty"),
    ]
    for flags, env, expected in cases:
        r = _hsmsign("--server", "127.0.0.1:1", *flags, "pubkey", "demo", env=env)
        assert r.returncode == 2, (flags, env, r.stderr)
        assert r.stderr.count("\n") == 1 and expected in r.stderr, r.stderr
        assert "d.e.f" not in r.stderr


def test_help_never_shows_the_token(tmp_path: Path) -> None:
    secret = "eyJhbGciOiJSUzI1NiJ9.e30.c2VjcmV0LXNpZ25hdHVyZQ"
    tok = tmp_path / "tok"
    tok.write_text(secret)
    r = _hsmsign("--help", env={"HSMSIGN_OIDC_TOKEN": secret, "HSMSIGN_OIDC_TOKEN_FILE": str(tok)})
    assert r.returncode == 0 and "--oidc-token-file" in r.stdout
    assert secret not in r.stdout and str(tok) not in r.stdout
