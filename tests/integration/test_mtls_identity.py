"""mTLS identities from real certificates against a real daemon: each typed rule admits
exactly the field it names, from the CA it names; expired and revoked certificates are
refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from hsmsign.client import TlsOptions
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.conftest import TokenDir, start_daemon, write_config
from tests.identity_pki import make_ca, make_leaf


def _admin_list(address: str, ca: Path, stem: Path) -> grpc.StatusCode:
    tls = TlsOptions(ca, stem.with_suffix(".crt"), stem.with_suffix(".key"))
    with grpc.secure_channel(address, tls.credentials()) as ch:
        try:
            pb_grpc.KeyAdminStub(ch).ListKeys(pb.ListKeysRequest(), timeout=30)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_admin_clients_name_is_not_matched_in_the_email_san(
    token: TokenDir, tmp_path: Path
) -> None:
    """The issue's finding: a certificate whose EMAIL SAN is "security-team" (its CN is
    someone else's) must not administer keys on a daemon that names "security-team"."""
    ca = make_ca("hsmsign test CA")
    ca_crt, _ = ca.write(tmp_path / "ca")
    srv_crt, srv_key = make_leaf(ca, "localhost", server=True).write(tmp_path / "server")
    make_leaf(ca, "mallory", email="security-team").write(tmp_path / "mallory")
    cfg = write_config(tmp_path / "c.toml", token, policy="")
    cfg.write_text(
        cfg.read_text()
        + f'\n[server.tls]\ncert = "{srv_crt}"\nkey = "{srv_key}"\nclient_ca = "{ca_crt}"\n'
        + 'admin_clients = ["security-team"]\n'
    )
    d = start_daemon(cfg, tmp_path / "d")
    try:
        assert _admin_list(d.address, ca_crt, tmp_path / "mallory") != grpc.StatusCode.OK
    finally:
        d.stop()
