"""hsmsignd as an operator meets it: start-up errors, config errors, TLS, health, shutdown."""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsmsign.client import Client, TlsOptions
from hsmsign.errors import RemoteError
from tests.conftest import Daemon, TokenDir, hsmsignd, start_daemon, write_config


def _fails(config: Path, *args: str) -> str:
    r = hsmsignd(config, *args, check=False, timeout=60)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hsmsignd:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_missing_module(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token, module="/nonexistent/libnothing.so")
    assert "PKCS#11 module not found: /nonexistent/libnothing.so" in _fails(cfg)


def test_module_that_is_not_pkcs11(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token, module="/usr/lib/x86_64-linux-gnu/libz.so.1")
    assert "cannot load PKCS#11 module" in _fails(cfg)


def test_token_not_found(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token)
    cfg.write_text(cfg.read_text().replace(f'label = "{token.label}"', 'label = "no-such-token"'))
    assert "no token with label 'no-such-token'" in _fails(cfg)


def test_wrong_pin_is_not_printed(token: TokenDir, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("wrong-pin-4711")
    pin.chmod(0o600)
    cfg = write_config(tmp_path / "c.toml", token, pin_line=f'pin_file = "{pin}"')
    line = _fails(cfg)
    assert "refused the PIN" in line and "wrong-pin-4711" not in line
    # the token is not locked by the failed attempt (never retried): the right PIN still works
    hsmsignd(write_config(tmp_path / "ok.toml", token), "keys", "list")


def test_pin_file_readable_by_others_is_refused(token: TokenDir, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text(token.pin)
    pin.chmod(0o644)
    cfg = write_config(tmp_path / "c.toml", token, pin_line=f'pin_file = "{pin}"')
    line = _fails(cfg)
    assert "readable by other users" in line and "chmod 600" in line
    assert token.pin not in line


def test_pin_from_environment(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token, pin_line='pin_env = "TEST_HSM_PIN"')
    line = _fails(cfg)
    assert "TEST_HSM_PIN is not set" in line
    d = start_daemon(cfg, tmp_path / "d", env={"TEST_HSM_PIN": token.pin})
    try:
        with Client(d.address) as c:
            assert c.public_key("demo").key.name == "demo"
        assert token.pin not in d.log()
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s.replace("sessions = 4", "sessions = 0"), "token.sessions: got 0"),
        (lambda s: s.replace("sessions = 4", 'sessions = "four"'), "token.sessions: got 'four'"),
        (lambda s: s + '\n[server]\nlisten = "nowhere"\n', "server.listen: got 'nowhere'"),
        (lambda s: s + "\n[server]\nbogus = 1\n", "server.bogus: unknown key"),
        (lambda s: s.replace("[token]", '[token]\npin = "1234"'), "PINs never go in the config"),
        (lambda s: s.replace("[token]", '[token]\nthreading = "yolo"'), "token.threading"),
        (lambda s: s + "\n[[broken", "not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_allowed(
    token: TokenDir, tmp_path: Path, edit: object, words: str
) -> None:
    cfg = write_config(tmp_path / "c.toml", token)
    cfg.write_text(edit(cfg.read_text()))  # type: ignore[operator]
    line = _fails(cfg)
    assert words in line and str(cfg) in line
    assert "1234" not in line or "pin" not in words


def test_missing_config_file(tmp_path: Path) -> None:
    line = _fails(tmp_path / "nope.toml")
    assert "cannot read config" in line and "nope.toml" in line


def test_port_in_use(config: Path, daemon: Daemon, tmp_path: Path) -> None:
    r = hsmsignd(config, "serve", "--listen", daemon.address, check=False, timeout=60)
    assert r.returncode == 1 and f"cannot listen on {daemon.address}" in r.stderr


def test_health_and_reflection(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "hsmsign.v1.Signer"):
            r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        resp = next(iter(refl.ServerReflectionInfo(iter([req]), timeout=10)))
        names = {s.name for s in resp.list_services_response.service}
        assert {"hsmsign.v1.Signer", "hsmsign.v1.KeyAdmin", "grpc.health.v1.Health"} <= names


def test_sigterm_drains_in_flight_calls(token: TokenDir, tmp_path: Path) -> None:
    # A generous grace period: the in-flight call must finish even on a slow machine.
    cfg = write_config(tmp_path / "c.toml", token, extra="[server]\ngrace_seconds = 120\n")
    d = start_daemon(cfg, tmp_path / "d")
    digests = [hashlib.sha256(str(i).encode()).digest() for i in range(10_000)]
    result: dict[str, object] = {}
    connected = threading.Event()

    def big_call() -> None:
        with Client(d.address, timeout=120) as c:
            try:
                # A first small call opens the connection, so the big one reaches the daemon
                # at once (on a loaded machine, connecting alone can take longer than the
                # pause below, and SIGTERM would then rightly refuse the call).
                c.public_key("demo")
                connected.set()
                result["sigs"] = c.sign_digests("demo", digests)[1]
            except RemoteError as e:
                result["error"] = e

    t = threading.Thread(target=big_call)
    t.start()
    assert connected.wait(60)
    time.sleep(1.0)  # the call is now in flight (10,000 signatures take several seconds)
    assert d.proc.poll() is None
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # While the big call drains, a new call is refused with a status that says to retry.
    with Client(d.address, timeout=30) as late, pytest.raises(RemoteError) as refused:
        late.public_key("demo")
    assert refused.value.status_name == "UNAVAILABLE"
    rc = d.stop(signal.SIGTERM)
    t.join(60)
    assert rc == 0
    assert "error" not in result and len(result["sigs"]) == 10_000  # type: ignore[arg-type]
    assert "SIGTERM received: draining" in d.log() and "stopped" in d.log()


# -- TLS --------------------------------------------------------------------------------------


def _cert(
    subject: str,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer: x509.Name | None = None,
    ca: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    return key, b.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(path.with_suffix(".key"), 0o600)
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def test_mutual_tls(token: TokenDir, tmp_path: Path) -> None:
    ca_key, ca = _cert("hsmsign test CA", ca=True)
    srv_key, srv = _cert("localhost", ca_key, ca.subject)
    cli_key, cli = _cert("build-agent-1", ca_key, ca.subject)
    _, other_ca = _cert("someone else's CA", ca=True)
    _write(tmp_path / "ca", ca_key, ca)
    _write(tmp_path / "server", srv_key, srv)
    _write(tmp_path / "client", cli_key, cli)
    (tmp_path / "other.crt").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    cfg = write_config(tmp_path / "c.toml", token, extra="")
    cfg.write_text(
        cfg.read_text()
        + f"""
[server.tls]
cert = "{tmp_path / "server.crt"}"
key = "{tmp_path / "server.key"}"
client_ca = "{tmp_path / "ca.crt"}"
"""
    )
    d = start_daemon(cfg, tmp_path / "d")
    try:
        ok = TlsOptions(tmp_path / "ca.crt", tmp_path / "client.crt", tmp_path / "client.key")
        with Client(d.address, ok) as c:
            sig = c.sign_digest("demo", b"\x02" * 32)
            assert len(sig.signature) == 256
        # no client certificate: refused by the TLS handshake
        with (
            Client(d.address, TlsOptions(tmp_path / "ca.crt"), timeout=5) as c,
            pytest.raises(RemoteError) as e,
        ):
            c.sign_digest("demo", b"\x02" * 32)
        assert e.value.status_name == "UNAVAILABLE"
        # a client that does not trust the daemon's CA refuses it
        with (
            Client(
                d.address,
                TlsOptions(
                    tmp_path / "other.crt", tmp_path / "client.crt", tmp_path / "client.key"
                ),
                timeout=5,
            ) as c,
            pytest.raises(RemoteError),
        ):
            c.sign_digest("demo", b"\x02" * 32)
        # plaintext clients get nowhere
        with Client(d.address, timeout=5) as c, pytest.raises(RemoteError):
            c.sign_digest("demo", b"\x02" * 32)
        # the CLI takes the same options
        out = d.hsmsign(
            "--tls-ca",
            str(tmp_path / "ca.crt"),
            "--tls-cert",
            str(tmp_path / "client.crt"),
            "--tls-key",
            str(tmp_path / "client.key"),
            "pubkey",
            "demo",
        ).stdout
        assert b"BEGIN PUBLIC KEY" in out
    finally:
        d.stop()


def test_token_selected_by_pkcs11_uri(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token)
    text = cfg.read_text().replace(
        f'label = "{token.label}"', f'uri = "pkcs11:token={token.label.replace("-", "%2D")}"'
    )
    cfg.write_text(text)
    assert "demo" in hsmsignd(cfg, "keys", "list").stdout
    cfg.write_text(text.replace('uri = "pkcs11:', 'uri = "pkcs11:pin-value=1234;'))
    line = _fails(cfg)
    assert "token.uri: must not carry a PIN" in line and "1234" not in line
    cfg.write_text(text.replace('uri = "pkcs11:', 'uri = "http:'))
    assert "RFC 7512" in _fails(cfg)
