"""mTLS identities from real certificates against a real daemon: each typed rule admits
exactly the field it names, from the CA it names; expired, revoked and foreign certificates
are refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from hsmsign.client import TlsOptions
from tests.conftest import Daemon, TokenDir, hsmsignd, start_daemon, write_config
from tests.harness.calls import sign_status
from tests.harness.pki import Issued, make_ca, make_crl, make_leaf

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED
NO_HANDSHAKE = grpc.StatusCode.UNAVAILABLE


def _tls_section(tmp_path: Path, server: Issued, client_ca: Path) -> str:
    crt, key = server.write(tmp_path / "server")
    return f'\n[server.tls]\ncert = "{crt}"\nkey = "{key}"\nclient_ca = "{client_ca}"\n'


def _sign(d: Daemon, ca: Path, stem: Path) -> tuple[grpc.StatusCode, str]:
    tls = TlsOptions(ca, stem.with_suffix(".crt"), stem.with_suffix(".key"))
    with grpc.secure_channel(d.address, tls.credentials()) as ch:
        return sign_status(ch)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("pki")
    ca1, ca2, foreign = make_ca("clients CA one"), make_ca("clients CA two"), make_ca("foreign")
    ca1.write(tmp / "ca1")
    ca2.write(tmp / "ca2")
    bundle = tmp / "client-cas.pem"
    bundle.write_bytes(ca1.cert_pem + ca2.cert_pem)
    revoked = make_leaf(ca1, "security-team")
    leaves = {
        "cn": make_leaf(ca1, "security-team"),
        "email-says-security-team": make_leaf(ca1, "mallory", email="security-team"),
        "uri": make_leaf(ca1, "whoever", uri="spiffe://example.org/ci/release"),
        "cn-holds-the-uri": make_leaf(ca1, "spiffe://example.org/ci/release"),
        "dns": make_leaf(ca1, "whoever", dns="agent.example.org"),
        "cn-holds-the-dns": make_leaf(ca1, "agent.example.org"),
        "email": make_leaf(ca1, "whoever", email="keys@example.org"),
        "uri-holds-the-email": make_leaf(ca1, "whoever", uri="keys@example.org"),
        "ca2-cn": make_leaf(ca2, "build-agent"),
        "ca1-says-build-agent": make_leaf(ca1, "build-agent"),
        "ca2-says-security-team": make_leaf(ca2, "security-team"),
        "expired": make_leaf(ca1, "security-team", expired=True),
        "revoked": revoked,
        "foreign": make_leaf(foreign, "security-team"),
    }
    for name, leaf in leaves.items():
        leaf.write(tmp / name)
    (tmp / "clients.crl").write_bytes(make_crl(ca1, [revoked.cert]))
    return {"tmp": tmp, "ca1": ca1, "bundle": bundle}


RULES = """
[identities]
client_crl = "{tmp}/clients.crl"
[[identities.mtls]]
name = "security"
ca = "{tmp}/ca1.crt"
subject_cn = "security-team"
[[identities.mtls]]
name = "release-ci"
ca = "{tmp}/ca1.crt"
uri_san = "spiffe://example.org/ci/release"
[[identities.mtls]]
name = "agent"
ca = "{tmp}/ca1.crt"
dns_san = "agent.example.org"
[[identities.mtls]]
name = "keys-mail"
ca = "{tmp}/ca1.crt"
email_san = "keys@example.org"
[[identities.mtls]]
name = "builder"
ca = "{tmp}/ca2.crt"
subject_cn = "build-agent"
[[policy.grant]]
identities = ["security"]
keys = ["*"]
operations = ["sign_digest", "list"]
"""

#: (client certificate, expected status, identity named in the refusal)
CASES = [
    ("cn", OK, None),
    ("email-says-security-team", UNAUTH, None),
    ("uri", DENIED, "'release-ci'"),
    ("cn-holds-the-uri", UNAUTH, None),
    ("dns", DENIED, "'agent'"),
    ("cn-holds-the-dns", UNAUTH, None),
    ("email", DENIED, "'keys-mail'"),
    ("uri-holds-the-email", UNAUTH, None),
    ("ca2-cn", DENIED, "'builder'"),
    ("ca1-says-build-agent", UNAUTH, None),
    ("ca2-says-security-team", UNAUTH, None),
    ("expired", NO_HANDSHAKE, None),
    ("revoked", UNAUTH, "revoked"),
    ("foreign", NO_HANDSHAKE, None),
]


def test_each_rule_admits_exactly_the_field_and_ca_it_names(
    token: TokenDir, pki: dict[str, object], tmp_path: Path
) -> None:
    tmp = pki["tmp"]
    assert isinstance(tmp, Path) and isinstance(pki["ca1"], Issued)
    server = make_leaf(pki["ca1"], "localhost", server=True)
    cfg = write_config(tmp_path / "c.toml", token, policy=RULES.format(tmp=tmp))
    cfg.write_text(cfg.read_text() + _tls_section(tmp_path, server, Path(str(pki["bundle"]))))
    d = start_daemon(cfg, tmp_path / "d")
    try:
        seen = {name: _sign(d, tmp / "ca1.crt", tmp / name) for name, _, _ in CASES}
    finally:
        d.stop()
    for name, expected, named in CASES:
        code, details = seen[name]
        assert code == expected, (name, code, details)
        if named is not None:
            assert named in details, (name, details)
        assert token.label not in details


def test_admin_clients_is_refused_with_a_pointer_to_the_rules(
    token: TokenDir, tmp_path: Path
) -> None:
    """The issue's finding: ``admin_clients`` matched its names in any field (a certificate
    whose EMAIL SAN was "security-team" administered keys). It is gone: a config still
    naming it does not start, and says what replaces it."""
    ca = make_ca("hsmsign test CA")
    ca_crt, _ = ca.write(tmp_path / "ca")
    cfg = write_config(tmp_path / "c.toml", token)
    cfg.write_text(
        cfg.read_text()
        + _tls_section(tmp_path, make_leaf(ca, "localhost", server=True), ca_crt)
        + 'admin_clients = ["security-team"]\n'
    )
    r = hsmsignd(cfg, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "server.tls.admin_clients: replaced by [[identities.mtls]]" in r.stderr


def test_a_rule_whose_ca_the_handshake_does_not_trust_stops_the_start(
    token: TokenDir, pki: dict[str, object], tmp_path: Path
) -> None:
    tmp = pki["tmp"]
    assert isinstance(tmp, Path) and isinstance(pki["ca1"], Issued)
    cfg = write_config(tmp_path / "c.toml", token, policy=RULES.format(tmp=tmp))
    only_ca1 = tmp / "ca1.crt"
    cfg.write_text(
        cfg.read_text() + _tls_section(tmp_path, make_leaf(pki["ca1"], "x", server=True), only_ca1)
    )
    r = hsmsignd(cfg, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "'builder': ca" in r.stderr
    assert "is neither in server.tls.client_ca nor issued by a CA in it" in r.stderr
