"""SIGHUP reloads the server certificate and key, the client CA, the client CRL and the
policy in a running daemon (server/reload.py) without dropping connections; a config that
does not load leaves the daemon serving with the one it had."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import Daemon, TokenDir, start_daemon, write_config
from tests.harness.calls import sign_status
from tests.harness.pki import Issued, make_ca, make_crl, make_leaf

OK = grpc.StatusCode.OK
RELOADED = "SIGHUP: config reloaded"
NOT_RELOADED = "SIGHUP: config not reloaded"

POLICY = """
[identities]
client_crl = "{tmp}/clients.crl"
[[identities.mtls]]
name = "signer"
ca = "{tmp}/client-ca.crt"
subject_cn = "release-signer"
[[policy.grant]]
identities = ["signer"]
keys = ["*"]
operations = [{operations}]
"""


@dataclass
class Setup:
    tmp: Path
    token: TokenDir
    processes: int
    server_ca: Issued
    client_ca: Issued
    alice: Issued

    @property
    def cfg(self) -> Path:
        return self.tmp / "hsmsignd.toml"

    def write_config(self, operations: str = '"sign_digest"', extra_token: str = "") -> None:
        extra = f"[server]\nprocesses = {self.processes}\n"
        write_config(
            self.cfg,
            self.token,
            extra=extra,
            extra_token=extra_token,
            policy=POLICY.format(tmp=self.tmp, operations=operations),
        )
        self.cfg.write_text(
            self.cfg.read_text()
            + f'\n[server.tls]\ncert = "{self.tmp}/server.crt"\nkey = "{self.tmp}/server.key"\n'
            f'client_ca = "{self.tmp}/client-ca.crt"\n'
        )


def _setup(tmp: Path, token: TokenDir, processes: int = 1) -> Setup:
    server_ca, client_ca = make_ca("server CA one"), make_ca("clients CA")
    server_ca.write(tmp / "server-ca")
    client_ca.write(tmp / "client-ca")
    make_leaf(server_ca, "localhost", server=True).write(tmp / "server")
    alice = make_leaf(client_ca, "release-signer")
    alice.write(tmp / "alice")
    (tmp / "clients.crl").write_bytes(make_crl(client_ca, []))
    s = Setup(tmp, token, processes, server_ca, client_ca, alice)
    s.write_config()
    return s


def _channel(d: Daemon, trust: Path, client: Path) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        trust.read_bytes(),
        client.with_suffix(".key").read_bytes(),
        client.with_suffix(".crt").read_bytes(),
    )
    # Its own connection: never one another channel of this test opened.
    return grpc.secure_channel(d.address, creds, options=[("grpc.use_local_subchannel_pool", 1)])


def _sign_on(ch: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    return sign_status(ch, timeout=10)


def _sign(d: Daemon, trust: Path, client: Path) -> tuple[grpc.StatusCode, str]:
    with _channel(d, trust, client) as ch:
        return _sign_on(ch)


def _sighup_and_wait(d: Daemon, s: Setup, marker: str) -> None:
    """Sends SIGHUP and waits (up to 10 s) until every serving process logged ``marker``."""
    before = d.log().count(marker)
    d.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while d.log().count(marker) < before + s.processes:
        assert d.proc.poll() is None, d.log()
        assert time.monotonic() < deadline, f"no {marker!r} from every process: {d.log()}"
        time.sleep(0.1)


@pytest.mark.parametrize("processes", [1, 2])
def test_new_server_certificate_for_new_connections_old_connection_kept(
    token: TokenDir, tmp_path: Path, processes: int
) -> None:
    s = _setup(tmp_path, token, processes)
    d = start_daemon(s.cfg, tmp_path / "d")
    try:
        old_trust, new_trust = tmp_path / "server-ca.crt", tmp_path / "new-server-ca.crt"
        opened_before = _channel(d, old_trust, tmp_path / "alice")
        assert _sign_on(opened_before) == (OK, "")
        new_ca = make_ca("server CA two")
        new_ca.write(tmp_path / "new-server-ca")
        make_leaf(new_ca, "localhost", server=True).write(tmp_path / "server")
        _sighup_and_wait(d, s, RELOADED)
        assert "TLS certificate" in d.log()
        # Several connections, so that with two processes both are reached.
        for _ in range(4 * processes):
            assert _sign(d, new_trust, tmp_path / "alice") == (OK, "")
            code, _ = _sign(d, old_trust, tmp_path / "alice")
            assert code == grpc.StatusCode.UNAVAILABLE
        assert _sign_on(opened_before) == (OK, "")
        opened_before.close()
        assert d.proc.poll() is None
    finally:
        d.stop()


def test_revoked_client_is_refused_after_reload(token: TokenDir, tmp_path: Path) -> None:
    s = _setup(tmp_path, token)
    d = start_daemon(s.cfg, tmp_path / "d")
    try:
        trust = tmp_path / "server-ca.crt"
        assert _sign(d, trust, tmp_path / "alice") == (OK, "")
        (tmp_path / "clients.crl").write_bytes(make_crl(s.client_ca, [s.alice.cert]))
        _sighup_and_wait(d, s, RELOADED)
        assert "CRL" in d.log()
        code, details = _sign(d, trust, tmp_path / "alice")
        assert code == grpc.StatusCode.UNAUTHENTICATED, details
        assert "revoked" in details
    finally:
        d.stop()


def test_removed_grant_is_refused_after_reload_token_change_named(
    token: TokenDir, tmp_path: Path
) -> None:
    s = _setup(tmp_path, token)
    d = start_daemon(s.cfg, tmp_path / "d")
    try:
        trust = tmp_path / "server-ca.crt"
        assert _sign(d, trust, tmp_path / "alice") == (OK, "")
        # [token] is not reloaded: the log line says a restart is needed for it.
        s.write_config(operations='"list"', extra_token='threading = "serialized"')
        _sighup_and_wait(d, s, RELOADED)
        line = next(ln for ln in d.log().splitlines() if RELOADED in ln)
        assert "(policy)" in line and "a restart is needed for [token]" in line, line
        code, details = _sign(d, trust, tmp_path / "alice")
        assert code == grpc.StatusCode.PERMISSION_DENIED, details
    finally:
        d.stop()


def test_broken_config_keeps_the_old_one(token: TokenDir, tmp_path: Path) -> None:
    s = _setup(tmp_path, token)
    d = start_daemon(s.cfg, tmp_path / "d")
    try:
        trust = tmp_path / "server-ca.crt"
        # A certificate whose key is not the server.key next to it.
        other = make_ca("server CA two")
        other_crt = make_leaf(other, "localhost", server=True).cert_pem
        good_crt = (tmp_path / "server.crt").read_bytes()
        (tmp_path / "server.crt").write_bytes(other_crt)
        _sighup_and_wait(d, s, NOT_RELOADED)
        warnings = [line for line in d.log().splitlines() if NOT_RELOADED in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0], warnings
        assert "server.tls" in warnings[0]
        assert _sign(d, trust, tmp_path / "alice") == (OK, "")
        # Not TOML at all: the same.
        (tmp_path / "server.crt").write_bytes(good_crt)
        s.cfg.write_text(s.cfg.read_text() + "\n[[[ not toml\n")
        _sighup_and_wait(d, s, NOT_RELOADED)
        assert "not valid TOML" in d.log()
        assert _sign(d, trust, tmp_path / "alice") == (OK, "")
        assert d.proc.poll() is None
    finally:
        d.stop()
