"""mTLS identities from certificates issued by intermediate CAs, against a real daemon.

The handshake trusts only the root (``server.tls.client_ca``); clients present their leaf
followed by its intermediate, the way an enterprise PKI issues them. A rule bound to an
intermediate admits only what that intermediate issued; a rule bound to the root admits what
any of its intermediates issued; a CRL of the intermediate or of the root is honoured.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from hsmsign.client import TlsOptions
from tests.conftest import Daemon, TokenDir, hsmsignd, start_daemon, write_config
from tests.harness.calls import sign_status
from tests.harness.pki import make_ca, make_crl, make_leaf

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED

RULES = """
[identities]
client_crl = "{tmp}/clients.crl"
[[identities.mtls]]
name = "release"
ca = "{tmp}/issuing-one.crt"
subject_cn = "release"
[[identities.mtls]]
name = "any-agent"
ca = "{tmp}/root.crt"
subject_cn = "agent"
[[policy.grant]]
identities = ["release"]
keys = ["*"]
operations = ["sign_digest"]
"""

#: (client certificate, expected status, text the refusal must carry)
CASES = [
    # issued by the intermediate the rule names
    ("one-release", OK, None),
    # the same name from a sibling intermediate under the same root: not that rule's CA
    ("two-release", UNAUTH, None),
    # a rule bound to the root admits what any intermediate under it issued
    ("two-agent", DENIED, "'any-agent'"),
    # revoked by the intermediate's CRL
    ("one-release-revoked", UNAUTH, "revoked"),
    # its intermediate is revoked by the root's CRL
    ("three-agent", UNAUTH, "revoked"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("pki")
    root = make_ca("clients root CA")
    one, two, three = (make_ca(f"issuing CA {n}", root) for n in ("one", "two", "three"))
    root.write(tmp / "root")
    one.write(tmp / "issuing-one")
    revoked = make_leaf(one, "release")
    leaves = {
        "one-release": (make_leaf(one, "release"), one),
        "two-release": (make_leaf(two, "release"), two),
        "two-agent": (make_leaf(two, "agent"), two),
        "one-release-revoked": (revoked, one),
        "three-agent": (make_leaf(three, "agent"), three),
    }
    for name, (leaf, issuer) in leaves.items():
        leaf.write(tmp / name, chain=(issuer,))
    (tmp / "clients.crl").write_bytes(make_crl(one, [revoked.cert]) + make_crl(root, [three.cert]))
    make_leaf(root, "localhost", server=True).write(tmp / "server")
    return tmp


def _config(tmp_path: Path, token: TokenDir, pki: Path) -> Path:
    cfg = write_config(tmp_path / "c.toml", token, policy=RULES.format(tmp=pki))
    cfg.write_text(
        cfg.read_text()
        + f'\n[server.tls]\ncert = "{pki / "server.crt"}"\nkey = "{pki / "server.key"}"\n'
        f'client_ca = "{pki / "root.crt"}"\n'
    )
    return cfg


def _sign(d: Daemon, pki: Path, name: str) -> tuple[grpc.StatusCode, str]:
    tls = TlsOptions(pki / "root.crt", pki / f"{name}.crt", pki / f"{name}.key")
    with grpc.secure_channel(d.address, tls.credentials()) as ch:
        return sign_status(ch)


def test_rules_bind_intermediates_and_crls_of_every_level_hold(
    token: TokenDir, pki: Path, tmp_path: Path
) -> None:
    d = start_daemon(_config(tmp_path, token, pki), tmp_path / "d")
    try:
        seen = {name: _sign(d, pki, name) for name, _, _ in CASES}
    finally:
        d.stop()
    for name, expected, named in CASES:
        code, details = seen[name]
        assert code == expected, (name, code, details)
        if named is not None:
            assert named in details, (name, details)


def test_a_rule_ca_that_chains_to_no_client_ca_stops_the_start(
    token: TokenDir, pki: Path, tmp_path: Path
) -> None:
    stranger_root = make_ca("someone else's root")
    make_ca("issuing CA one", stranger_root).write(pki / "stranger-issuing")
    cfg = _config(tmp_path, token, pki)
    cfg.write_text(cfg.read_text().replace("issuing-one.crt", "stranger-issuing.crt"))
    r = hsmsignd(cfg, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "is neither in server.tls.client_ca nor issued by a CA in it" in r.stderr
    assert "Traceback" not in r.stderr
