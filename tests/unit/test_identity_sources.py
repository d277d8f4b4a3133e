"""Which identity a call gets, from what the transport says (peer, TLS, metadata): the
order token > certificate > local, no fallback after a failed credential, tokens only over
TLS or local plaintext; and the config that sets it up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.errors import ConfigError, Unauthenticated
from server.identity.identify import Identifier
from server.identity.local import is_local_address, is_local_peer
from server.identity.model import IdentityConfig, LocalIdentity, OidcIssuer
from server.policy.config import load_access
from tests.harness.identity import TokenIssuer


class TransportView:
    """What a grpc.ServicerContext tells about the caller (peer, auth context, metadata):
    the three methods Identifier reads."""

    def __init__(self, peer: str, tls: bool, token: str | None = None) -> None:
        self._peer, self._tls, self._token = peer, tls, token

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"transport_security_type": [b"ssl" if self._tls else b"insecure"]}

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self._token}")] if self._token else []


def _identifier(tmp_path: Path, issuer: TokenIssuer, local: bool) -> Identifier:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    oidc = OidcIssuer("ci", issuer.iss, issuer.audience, jwks, None)
    return Identifier(IdentityConfig(oidc=(oidc,), local=LocalIdentity(local)), None)


def _who(identifier: Identifier, view: TransportView) -> str:
    ctx: Any = view
    try:
        return identifier.identify(ctx).kind
    except Unauthenticated as e:
        return f"UNAUTHENTICATED: {e}"


def test_tokens_only_over_tls_unless_local_plaintext(tmp_path: Path) -> None:
    issuer = TokenIssuer()
    strict, dev = _identifier(tmp_path, issuer, False), _identifier(tmp_path, issuer, True)
    token = issuer.token()
    assert _who(strict, TransportView("ipv4:10.0.0.5:4000", True, token)) == "oidc"
    assert "only over TLS" in _who(strict, TransportView("ipv4:10.0.0.5:4000", False, token))
    assert "only over TLS" in _who(strict, TransportView("ipv4:127.0.0.1:4000", False, token))
    assert _who(dev, TransportView("ipv4:127.0.0.1:4000", False, token)) == "oidc"
    assert "only over TLS" in _who(dev, TransportView("ipv4:10.0.0.5:4000", False, token))


def test_local_only_for_local_peers_and_never_after_a_failed_token(tmp_path: Path) -> None:
    issuer = TokenIssuer()
    dev = _identifier(tmp_path, issuer, True)
    assert _who(dev, TransportView("ipv4:127.0.0.1:4000", False)) == "local"
    assert _who(dev, TransportView("ipv6:[::1]:4000", False)) == "local"
    assert _who(dev, TransportView("unix:/run/hsmsign.sock", False)) == "local"
    assert "no credentials" in _who(dev, TransportView("ipv4:192.168.1.2:4000", True))
    bad = issuer.token(aud="other")
    assert "audience" in _who(dev, TransportView("ipv4:127.0.0.1:4000", False, bad))
    strict = _identifier(tmp_path, issuer, False)
    assert "no credentials" in _who(strict, TransportView("ipv4:127.0.0.1:4000", True))


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:1", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("unix:/run/hsmsign/admin.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.0.0.1:50051", False),
        ("hsm.example.org:50051", False),
    ],
)
def test_local_addresses(address: str, local: bool) -> None:
    assert is_local_address(address) is local


def test_local_peers() -> None:
    assert is_local_peer("ipv4:127.0.0.1:1234") and is_local_peer("ipv6:[::1]:1")
    assert not is_local_peer("ipv4:10.1.1.1:1234") and not is_local_peer("ipv6:[2001:db8::1]:1")


def _load(tmp_path: Path, text: str) -> Any:
    import tomllib

    return load_access(tmp_path / "c.toml", tomllib.loads(text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[policy.grant]]\nidentities = ['x']\nkeys = ['*']\noperations = ['sing']\n",
            "policy.grant[0].operations: got 'sing'; allowed: \"*\" or get_public_key",
        ),
        (
            "[[policy.grant]]\nidentities = []\nkeys = ['*']\noperations = ['*']\n",
            "policy.grant[0].identities: got []",
        ),
        (
            "[[policy.grant]]\nidentities = ['x']\nkeys = ['*']\noperations = ['*']\nkey = 1\n",
            "policy.grant[0].key: unknown key",
        ),
        (
            "[[identities.mtls]]\nname = 'a'\nca = 'ca.pem'\nsubject_cn = 'a'\ndns_san = 'a'\n",
            "exactly one of uri_san, dns_san, email_san, subject_cn",
        ),
        (
            "[[identities.oidc]]\nname = 'g'\nissuer = 'https://i'\naudience = 'a'\n"
            "jwks_url = 'http://example.org/jwks'\n",
            "jwks_url: got 'http://example.org/jwks'",
        ),
        (
            "[[identities.oidc]]\nname = 'local'\nissuer = 'https://i'\naudience = 'a'\n"
            "jwks_file = 'j.json'\n",
            "identity name 'local' is used twice",
        ),
        ("[policy.limits.x]\nburst = 3\n", "policy.limits.x.burst: goes with rate"),
        ("[identities.local]\nenabled = 'yes'\n", "identities.local.enabled: got 'yes'"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert message in str(e.value) and str(tmp_path / "c.toml") in str(e.value)


def test_no_config_identifies_nobody_and_grants_nothing(tmp_path: Path) -> None:
    access = _load(tmp_path, "")
    assert access.policy.grants == () and not access.identities.local.enabled


def test_policy_from_its_own_file(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(
        "[[grant]]\nidentities = ['ci']\nkeys = ['r-*']\noperations = ['sign_digest']\n"
        "[limits.ci]\nrate = 5\n"
    )
    access = _load(tmp_path, "[policy]\nfile = 'policy.toml'\n")
    assert access.policy.grants[0].keys == ("r-*",) and access.policy.limits["ci"].rate == 5


def test_the_gate_records_who_called_and_what_it_decided(tmp_path: Path) -> None:
    """What the access log and the audit read after a call: its identity and decisions."""
    from hsmsign.v1 import hsmsign_pb2 as pb
    from server import config
    from server.errors import PermissionDenied
    from server.identity import current_identity
    from server.policy import gate
    from server.policy.model import Operation

    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text(
        '[token]\nmodule = "/nonexistent.so"\nlabel = "t"\npin_env = "PIN"\n'
        "[identities.local]\nenabled = true\n"
        "[[policy.grant]]\nidentities = ['local']\nkeys = ['demo']\noperations = ['get']\n"
    )
    cfg = config.load(cfg_path)
    g = gate.Gate(cfg.access, cfg, "127.0.0.1:0")
    ctx: Any = TransportView("ipv4:127.0.0.1:4000", False)
    with g.admit(None, "GetKey", pb.GetKeyRequest(name="demo"), ctx) as identity:
        assert identity.kind == "local" and current_identity() == identity
    with pytest.raises(PermissionDenied), g.admit(None, "GetKey", pb.GetKeyRequest(name="x"), ctx):
        pass
    record = gate.current_access()
    assert record is not None and record.identity is not None
    assert record.method == "GetKey" and record.identity.name == "local"
    assert record.decisions == [gate.Decision(Operation.GET, "'x'", False)]
    remote: Any = TransportView("ipv4:10.0.0.9:4000", True)
    with (
        pytest.raises(Unauthenticated),
        g.admit(None, "GetKey", pb.GetKeyRequest(name="x"), remote),
    ):
        pass
    record = gate.current_access()
    assert record is not None and record.identity is None and current_identity() is None
