"""hsmsignd as an operator meets it: start-up errors, config errors, TLS, health, shutdown."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsmsign.client import Client, TlsOptions
from hsmsign.errors import RemoteError
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server.tomltable import MULTIARCH
from tests.conftest import HSMSIGN, Daemon, TokenDir, hsmsignd, start_daemon, write_config
from tests.harness.pki import add_server_tls as _with_server_tls
from tests.harness.pki import make_ca, make_leaf
from tests.harness.pki import write_tls_files as _tls_files


def _failure(config: Path, *args: str) -> tuple[str, str]:
    """The one 'hsmsignd:' error line of a failed run, and everything it wrote to stderr."""
    r = hsmsignd(config, *args, check=False, timeout=60)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hsmsignd:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0], r.stderr


def _fails(config: Path, *args: str) -> str:
    return _failure(config, *args)[0]


def test_missing_module(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token, module="/nonexistent/libnothing.so")
    assert "PKCS#11 module not found: /nonexistent/libnothing.so" in _fails(cfg)


def test_module_that_is_not_pkcs11(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token, module="/usr/lib/${MULTIARCH}/libz.so.1")
    assert "cannot load PKCS#11 module" in _fails(cfg)
    # ${MULTIARCH} became this machine's directory (the dev default relies on it).
    assert f"/usr/lib/{MULTIARCH}/libz.so.1" in _fails(cfg)


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


def test_unreadable_pin_file_and_config_are_one_line(token: TokenDir, tmp_path: Path) -> None:
    """A PIN 'file' that is a directory or not UTF-8, and a config that is not UTF-8: one
    line naming the file, no traceback, and none of the file's bytes."""
    pin_dir = tmp_path / "pin.d"
    pin_dir.mkdir(mode=0o700)
    cfg = write_config(tmp_path / "c.toml", token, pin_line=f'pin_file = "{pin_dir}"')
    assert f"token.pin_file: cannot read {pin_dir}: Is a directory" in _fails(cfg)
    pin = tmp_path / "pin"
    pin.write_bytes(b"\xff\xfe4711")
    pin.chmod(0o600)
    cfg = write_config(tmp_path / "c.toml", token, pin_line=f'pin_file = "{pin}"')
    line = _fails(cfg)
    assert f"token.pin_file: {pin} is not UTF-8 text" in line and "0xff" not in line
    cfg.write_bytes(b'log_level = "INFO"\n# caf\xe9\n')
    assert f"{cfg}: not UTF-8 text (byte 24)" in _fails(cfg)


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


#: A PIN written into a config by mistake: distinctive, so it cannot match a pid or a time.
CONFIG_PIN = "pin-in-config-4711"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda s: s.replace("sessions = 4", "sessions = 0"), "token.sessions: got 0"),
        (lambda s: s.replace("sessions = 4", 'sessions = "four"'), "token.sessions: got 'four'"),
        (lambda s: s + '\n[server]\nlisten = "nowhere"\n', "server.listen: got 'nowhere'"),
        (lambda s: s + "\n[server]\nbogus = 1\n", "server.bogus: unknown key"),
        (
            lambda s: s.replace("[token]", f'[token]\npin = "{CONFIG_PIN}"'),
            "PINs never go in the config",
        ),
        (lambda s: s.replace("[token]", '[token]\nthreading = "yolo"'), "token.threading"),
        (lambda s: s + "\n[[broken", "not valid TOML"),
    ],
)
def test_bad_config_names_file_key_and_allowed(
    token: TokenDir, tmp_path: Path, edit: object, words: str
) -> None:
    cfg = write_config(tmp_path / "c.toml", token)
    cfg.write_text(edit(cfg.read_text()))  # type: ignore[operator]
    line, stderr = _failure(cfg)
    assert words in line and str(cfg) in line
    assert CONFIG_PIN not in stderr  # a PIN put in the config is in no log line


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


def test_mutual_tls(token: TokenDir, tmp_path: Path) -> None:
    ca = make_ca("hsmsign test CA")
    ca.write(tmp_path / "ca")
    make_leaf(ca, "localhost", server=True).write(tmp_path / "server")
    make_leaf(ca, "build-agent-1").write(tmp_path / "client")
    (tmp_path / "other.crt").write_bytes(make_ca("someone else's CA").cert_pem)
    cfg = _with_server_tls(write_config(tmp_path / "c.toml", token, extra=""), tmp_path)
    d = start_daemon(cfg, tmp_path / "d")
    try:
        ok = TlsOptions(tmp_path / "ca.crt", tmp_path / "client.crt", tmp_path / "client.key")
        with Client(d.address, ok) as c:
            sig = c.sign_digest("demo", b"\x02" * 32)
            assert len(sig.signature) == 256
        # no client certificate: refused by the TLS handshake, with a hint
        with (
            Client(d.address, TlsOptions(tmp_path / "ca.crt"), timeout=5) as c,
            pytest.raises(RemoteError) as e,
        ):
            c.sign_digest("demo", b"\x02" * 32)
        assert e.value.status_name == "UNAVAILABLE"
        assert "requires client certificates, pass --tls-cert and --tls-key" in str(e.value)
        # The CLI says the same in one line: none of gRPC's own log lines.
        r = d.hsmsign("--tls-ca", str(tmp_path / "ca.crt"), "pubkey", "demo", check=False)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1, err
        assert err.startswith("hsmsign: error: UNAVAILABLE") and "--tls-cert" in err
        # A CA that did not sign the daemon's certificate: gRPC would log the handshake error.
        tls_args = ["--tls-cert", str(tmp_path / "client.crt"), "--tls-key"]
        r = d.hsmsign(
            *["--tls-ca", str(tmp_path / "other.crt"), *tls_args, str(tmp_path / "client.key")],
            "pubkey",
            "demo",
            check=False,
        )
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1, err
        assert "check that --tls-ca signed the daemon's certificate" in err
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
        # plaintext clients get nowhere, and are told why it may be
        with Client(d.address, timeout=5) as c, pytest.raises(RemoteError) as e:
            c.sign_digest("demo", b"\x02" * 32)
        assert "if the daemon uses TLS, pass --tls-ca" in str(e.value)
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


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tls-cert", "client.crt"], "only the certificate was given (add the key: --tls-key"),
        (["--tls-key", "client.key"], "only the key was given (add the certificate: --tls-cert"),
        (
            ["--tls-cert", "client.crt", "--tls-key", "server.key"],
            "the private key in server.key does not belong to the certificate in client.crt",
        ),
        (["--tls-cert", "client.crt", "--tls-key", "client.crt"], "client.crt is not an "),
        (["--tls-cert", "client.key", "--tls-key", "client.key"], "client.key holds no PEM"),
    ],
    ids=["cert-only", "key-only", "mismatch", "cert-as-key", "key-as-cert"],
)
def test_client_tls_files_are_checked_before_grpc(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    """gRPC's C core aborts the process (SIGABRT) on a client certificate without its key,
    and reports a wrong key only as a failed handshake: the CLI names the file instead."""
    _tls_files(tmp_path)
    r = subprocess.run(
        [HSMSIGN, "--server", "127.0.0.1:1", "--tls-ca", "ca.crt", *flags, "pubkey", "demo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("hsmsign: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr
    # The same through the environment, as CI systems pass secrets.
    env = dict(os.environ, HSMSIGN_TLS_CA="ca.crt", HSMSIGN_TLS_CERT="client.crt")
    r = subprocess.run(
        [HSMSIGN, "--server", "127.0.0.1:1", "pubkey", "demo"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert r.returncode == 2 and "add the key: --tls-key or HSMSIGN_TLS_KEY" in r.stderr


def test_daemon_tls_files_are_checked_at_start(token: TokenDir, tmp_path: Path) -> None:
    """A wrong server certificate or key is named at start-up, not reported as a port in
    use (which is what gRPC's failed listen looked like)."""
    _tls_files(tmp_path)
    cfg = write_config(tmp_path / "c.toml", token, extra="")
    base = cfg.read_text()

    def with_tls(cert: str, key: str, client_ca: str | None = None) -> str:
        ca = f'client_ca = "{tmp_path / client_ca}"\n' if client_ca else ""
        return _fails_with(
            cfg,
            base + f'\n[server.tls]\ncert = "{tmp_path / cert}"\nkey = "{tmp_path / key}"\n' + ca,
        )

    assert "does not belong to the certificate in cert" in with_tls("server.crt", "client.key")
    assert "server.tls: cert " in with_tls("server.key", "server.key")
    assert "holds no PEM certificate" in with_tls("server.key", "server.key")
    assert "is not an unencrypted PEM private key" in with_tls("server.crt", "server.crt")
    line = with_tls("server.crt", "server.key", client_ca="server.key")
    assert "server.tls: client_ca " in line and "holds no PEM certificate" in line
    assert "cannot listen" not in with_tls("server.crt", "client.key")


def _fails_with(cfg: Path, text: str) -> str:
    cfg.write_text(text)
    r = hsmsignd(cfg, "serve", "--listen", "127.0.0.1:0", check=False, timeout=60)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("hsmsignd:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_key_admin_only_for_named_client_certificates(token: TokenDir, tmp_path: Path) -> None:
    """Typed mTLS rules and grants: build agents sign; only the security team's certificate
    may administer keys; a refused call is PERMISSION_DENIED, logged, and changes nothing.
    (More in tests/integration/test_mtls_identity.py.)"""
    ca = make_ca("hsmsign test CA")
    ca.write(tmp_path / "ca")
    make_leaf(ca, "localhost", server=True).write(tmp_path / "server")
    make_leaf(ca, "build-agent-1").write(tmp_path / "agent")
    make_leaf(ca, "security-team").write(tmp_path / "admin")
    rules = "".join(
        f'[[identities.mtls]]\nname = "{n}"\nca = "{tmp_path / "ca.crt"}"\nsubject_cn = "{n}"\n'
        for n in ("security-team", "build-agent-1")
    )
    grants = (
        '[[policy.grant]]\nidentities = ["build-agent-1"]\nkeys = ["demo"]\n'
        'operations = ["sign_digest"]\n'
        '[[policy.grant]]\nidentities = ["security-team"]\nkeys = ["*"]\noperations = ["*"]\n'
    )
    cfg = write_config(tmp_path / "c.toml", token, extra="", policy=rules + grants)
    cfg = _with_server_tls(cfg, tmp_path)
    d = start_daemon(cfg, tmp_path / "d")
    try:

        def admin(who: str) -> pb_grpc.KeyAdminStub:
            tls = TlsOptions(tmp_path / "ca.crt", tmp_path / f"{who}.crt", tmp_path / f"{who}.key")
            return pb_grpc.KeyAdminStub(grpc.secure_channel(d.address, tls.credentials()))

        agent = TlsOptions(tmp_path / "ca.crt", tmp_path / "agent.crt", tmp_path / "agent.key")
        with Client(d.address, agent) as c:
            assert len(c.sign_digest("demo", b"\x03" * 32).signature) == 256
        request = pb.CreateKeyRequest(
            name="sneaky", purpose=pb.KEY_PURPOSE_SIGN, algorithm=pb.KEY_ALGORITHM_RSA_2048
        )
        with pytest.raises(grpc.RpcError) as e:
            admin("agent").CreateKey(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'build-agent-1' (subject_cn build-agent-1) may not create key 'sneaky'" in (
            e.value.details() or ""
        )
        names = [k.name for k in admin("admin").ListKeys(pb.ListKeysRequest(), timeout=30).keys]
        assert "demo" in names and "sneaky" not in names
        d.wait_log("CreateKey peer=", "status=PERMISSION_DENIED")
    finally:
        d.stop()


def test_key_admin_can_be_turned_off(token: TokenDir, tmp_path: Path) -> None:
    """server.key_admin = false: signing as usual, every KeyAdmin call refused, health says
    NOT_SERVING for KeyAdmin, and the token is still administered locally."""
    cfg = write_config(tmp_path / "c.toml", token, extra="")
    cfg.write_text(cfg.read_text() + "\n[server]\nkey_admin = false\n")
    d = start_daemon(cfg, tmp_path / "d")
    try:
        with Client(d.address) as c:
            assert len(c.sign_digest("demo", b"\x04" * 32).signature) == 256
        r = d.hsmsign("keys", "list", check=False)
        err = r.stderr.decode()
        assert r.returncode != 0 and err.count("\n") == 1 and "Traceback" not in err, err
        assert "PERMISSION_DENIED" in err and "server.key_admin = false" in err
        with grpc.insecure_channel(d.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            status = stub.Check(
                health_pb2.HealthCheckRequest(service="hsmsign.v1.KeyAdmin"), timeout=10
            ).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        d.stop()
    assert "demo" in hsmsignd(cfg, "keys", "list").stdout


def test_key_admin_config_errors(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token, extra="")
    base = cfg.read_text()
    tls = '\n[server.tls]\ncert = "s.crt"\nkey = "s.key"\n'
    cfg.write_text(base + tls + 'admin_clients = ["security-team"]\n')
    assert "admin_clients: replaced by [[identities.mtls]]" in _fails(cfg, "keys", "list")
    cfg.write_text(base + '\n[server]\nkey_admin = "no"\n')
    assert "server.key_admin: got 'no'; allowed: true or false" in _fails(cfg, "keys", "list")
    cfg.write_text(base + '\n[server.tsl]\ncert = "s.crt"\n')
    line = _fails(cfg, "keys", "list")
    assert "server.tsl: unknown key" in line and "tls" in line.split("allowed here:")[1]


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
