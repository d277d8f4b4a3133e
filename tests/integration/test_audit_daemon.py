"""The audit trail of a real daemon on a real SoftHSM2 token: what is recorded, fail-closed
writes, recovery without restart, SIGKILL under load, and a human log that never blocks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsmsign import keyformats
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness import HSMSIGN, HSMSIGND, TokenDir, hsmsignd, leaks, make_token, write_config
from tests.harness.h2raw import RawH2Connection
from tests.harness.pki import make_ca, make_leaf

SHA256 = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def audit_token(tmp_path_factory: pytest.TempPathFactory) -> TokenDir:
    """A token of this module's own (its audit key is made by the first daemon)."""
    t = make_token(tmp_path_factory.mktemp("audit-token"))
    hsmsignd(write_config(t.path / "plain.toml", t), "keys", "create", "demo")
    return t


def audit_config(
    tmp: Path,
    token: TokenDir,
    *,
    audit: str = "",
    server: str = "processes = 1",
    policy: str | None = None,
) -> Path:
    """A config with ``[audit]`` under ``tmp/audit``; ``policy`` as write_config's (default:
    the local caller may do everything)."""
    path = write_config(tmp / "hsmsignd.toml", token, policy=policy)
    path.write_text(
        path.read_text()
        + f"\n[server]\n{server}\n\n[audit]\n"
        + f'path = "{tmp / "audit"}"\nretry_seconds = 0.5\n{audit}\n'
    )
    return path


class Running:
    def __init__(self, proc: subprocess.Popen[bytes], address: str, tmp: Path) -> None:
        self.proc, self.address, self.tmp = proc, address, tmp
        self.channel = grpc.insecure_channel(address)
        self.signer = pb_grpc.SignerStub(self.channel)
        self.admin = pb_grpc.KeyAdminStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def sign(self, digest: bytes = b"\x01" * 32, request_id: str | None = None) -> Any:
        md: tuple[tuple[str, str | bytes], ...] = (
            (("x-request-id", request_id),) if request_id else ()
        )
        return self.signer.SignDigest.with_call(
            pb.SignDigestRequest(key=pb.KeyRef(name="demo"), algorithm=SHA256, digest=digest),
            metadata=md,
            timeout=10,
        )

    def status(self, service: str = "") -> int:
        r = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(r.status)

    def wait_status(self, want: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while self.status() != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"health never became {want}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(
    config: Path,
    tmp: Path,
    *,
    stderr: int | IO[bytes] | None = None,
    prefix: tuple[str, ...] = (),
) -> Running:
    """hsmsignd on a free loopback port; stderr to the daemon.log file unless given."""
    ready = tmp / "ready.json"
    ready.unlink(missing_ok=True)
    log = open(tmp / "daemon.log", "ab")  # noqa: SIM115  (kept by the subprocess)
    proc = subprocess.Popen(
        [
            *prefix,
            HSMSIGND,
            "--config",
            str(config),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=stderr if stderr is not None else log,
    )
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None:
            raise AssertionError(f"hsmsignd exited {proc.returncode}: {daemon_log(tmp)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"not ready: {daemon_log(tmp)}")
        time.sleep(0.05)
    return Running(proc, json.loads(ready.read_text())["address"], tmp)


def daemon_log(tmp: Path) -> str:
    p = tmp / "daemon.log"
    return p.read_text(errors="replace") if p.exists() else ""


def records(tmp: Path) -> list[dict[str, Any]]:
    out = []
    for f in sorted((tmp / "audit").glob("audit-*.jsonl")):
        if ".checkpoints." not in f.name:
            out += [json.loads(line) for line in f.read_text().splitlines()]
    return out


def verify(tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HSMSIGN, "audit", "verify", str(tmp / "audit"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture()
def running(audit_token: TokenDir, tmp_path: Path) -> Iterator[Running]:
    d = start(audit_config(tmp_path, audit_token, audit="checkpoint_records = 5"), tmp_path)
    yield d
    d.stop()


def test_every_call_is_recorded_with_its_request_id_and_no_secret(
    running: Running, tmp_path: Path, audit_token: TokenDir
) -> None:
    digest = os.urandom(32)
    _, call = running.sign(digest, request_id="build-42")
    assert ("x-request-id", "build-42") in tuple(call.trailing_metadata())
    batch = [os.urandom(32) for _ in range(3)]
    running.signer.SignDigests(
        pb.SignDigestsRequest(key=pb.KeyRef(name="demo"), algorithm=SHA256, digests=batch)
    )
    session_key = os.urandom(16)
    for secret in (session_key, digest, *batch):
        leaks.remember(secret, "a session key or digest of the audit test")
    running.signer.SealSessionKey(
        pb.SealSessionKeyRequest(key=pb.KeyRef(name="demo"), session_key=session_key)
    )
    with pytest.raises(grpc.RpcError) as missing:
        running.signer.SignDigest(
            pb.SignDigestRequest(key=pb.KeyRef(name="nope"), algorithm=SHA256, digest=digest)
        )
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    generated = {m.key: m.value for m in missing.value.trailing_metadata()}["x-request-id"]
    with pytest.raises(grpc.RpcError) as bad:
        running.signer.SignDigest(
            pb.SignDigestRequest(key=pb.KeyRef(name="demo"), algorithm=SHA256, digest=b"short")
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    running.admin.ListKeys(pb.ListKeysRequest())
    running.stop()

    recs = [r for r in records(tmp_path) if r["kind"] == "call"]
    by_id = {r["request_id"]: r for r in recs}
    signed = by_id["build-42"]
    assert signed["op"] == "SignDigest" and signed["outcome"] == "ok"
    assert (signed["key"], signed["version"]) == ("demo", 1)
    assert len(signed["fingerprint"]) == 64
    assert signed["inputs"]["digest"] == "sha256:" + hashlib.sha256(digest).hexdigest()
    assert signed["time"].endswith("Z") and signed["peer"].startswith("ipv4:127.0.0.1:")
    assert signed["identity"] == {"kind": "local", "name": "local", "subject": "loopback"}
    batch_rec = next(r for r in recs if r["op"] == "SignDigests")
    assert len(batch_rec["inputs"]["digests"]) == 3
    refused = by_id[generated]
    assert (refused["outcome"], refused["status"], refused["key"]) == (
        "refused",
        "NOT_FOUND",
        "nope",
    )
    assert any(r["status"] == "INVALID_ARGUMENT" for r in recs)
    assert any(r["op"] == "ListKeys" and r["outcome"] == "ok" for r in recs)

    v = verify(tmp_path)
    assert v.returncode == 0, v.stdout + v.stderr
    # No secret in any audit file or log line: PIN, session key, digests in any encoding.
    text = "".join(p.read_text(errors="replace") for p in (tmp_path / "audit").glob("*.jsonl"))
    text += daemon_log(tmp_path)
    for secret in (session_key, digest, *batch):
        for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
            assert form not in text
    assert audit_token.pin not in text


def test_key_admin_turned_off_refusal_is_recorded(audit_token: TokenDir, tmp_path: Path) -> None:
    d = start(
        audit_config(tmp_path, audit_token, server="processes = 1\nkey_admin = false"), tmp_path
    )
    try:
        with pytest.raises(grpc.RpcError) as e:
            d.admin.CreateKey(pb.CreateKeyRequest(name="x", purpose=pb.KEY_PURPOSE_SIGN))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        d.stop()
    rec = next(r for r in records(tmp_path) if r.get("op") == "CreateKey")
    assert (rec["outcome"], rec["status"], rec["key"]) == ("refused", "PERMISSION_DENIED", "x")


def test_two_serving_processes_keep_one_chain_each(audit_token: TokenDir, tmp_path: Path) -> None:
    d = start(audit_config(tmp_path, audit_token, server="processes = 2"), tmp_path)
    try:
        for _ in range(20):
            grpc.insecure_channel(d.address)  # new connections spread over the processes
            d.sign()
    finally:
        d.stop()
    assert {r["chain"] for r in records(tmp_path)} == {"1", "2"}
    v = verify(tmp_path)
    assert v.returncode == 0, v.stdout
    assert sum(c["records"] for c in json.loads(v.stdout)["chains"]) >= 20


def test_a_call_the_policy_refuses_is_recorded_with_its_caller(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    policy = (
        "[identities.local]\nenabled = true\n"
        '[[policy.grant]]\nidentities = ["local"]\nkeys = ["other-*"]\n'
        'operations = ["sign_digest"]\n'
    )
    d = start(audit_config(tmp_path, audit_token, policy=policy), tmp_path)
    try:
        with pytest.raises(grpc.RpcError) as e:
            d.sign(request_id="denied-1")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        trailers = {m.key: str(m.value) for m in e.value.trailing_metadata()}
        assert trailers["x-request-id"] == "denied-1"
    finally:
        d.stop()
    rec = next(r for r in records(tmp_path) if r.get("request_id") == "denied-1")
    assert (rec["op"], rec["outcome"], rec["status"], rec["key"]) == (
        "SignDigest",
        "refused",
        "PERMISSION_DENIED",
        "demo",
    )
    assert rec["identity"] == {"kind": "local", "name": "local", "subject": "loopback"}
    assert "sign_digest" in rec["message"] and "fingerprint" not in rec  # no key was used
    assert verify(tmp_path).returncode == 0


def test_a_rate_limited_call_is_recorded_and_keeps_its_retry_hint(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    policy = (
        "[identities.local]\nenabled = true\n"
        '[[policy.grant]]\nidentities = ["local"]\nkeys = ["*"]\noperations = ["*"]\n'
        "[policy.limits.local]\nrate = 0.1\nburst = 1\n"
    )
    d = start(audit_config(tmp_path, audit_token, policy=policy), tmp_path)
    try:
        d.sign(request_id="within-limit")
        with pytest.raises(grpc.RpcError) as e:
            d.sign(request_id="over-limit")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = {m.key: str(m.value) for m in e.value.trailing_metadata()}
        assert trailers["x-request-id"] == "over-limit" and int(trailers["retry-after-ms"]) > 0
    finally:
        d.stop()
    rec = next(r for r in records(tmp_path) if r.get("request_id") == "over-limit")
    assert (rec["outcome"], rec["status"]) == ("refused", "RESOURCE_EXHAUSTED")
    assert rec["identity"]["name"] == "local"


def test_an_unidentified_caller_is_recorded_as_unauthenticated(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    _pki(tmp_path)
    policy = (
        f'[[identities.mtls]]\nname = "agents"\nca = "{tmp_path / "ca.crt"}"\n'
        'subject_cn = "someone-else"\n'
        '[[policy.grant]]\nidentities = ["agents"]\nkeys = ["*"]\noperations = ["*"]\n'
    )
    config = audit_config(tmp_path, audit_token, policy=policy)
    config.write_text(
        config.read_text()
        + f'\n[server.tls]\ncert = "{tmp_path / "server.crt"}"\n'
        + f'key = "{tmp_path / "server.key"}"\nclient_ca = "{tmp_path / "ca.crt"}"\n'
    )
    d = start(config, tmp_path)
    try:
        creds = grpc.ssl_channel_credentials(
            (tmp_path / "ca.crt").read_bytes(),
            (tmp_path / "agent.key").read_bytes(),
            (tmp_path / "agent.crt").read_bytes(),
        )
        with grpc.secure_channel(d.address, creds) as channel, pytest.raises(grpc.RpcError) as e:
            pb_grpc.SignerStub(channel).SignDigest(
                pb.SignDigestRequest(
                    key=pb.KeyRef(name="demo"), algorithm=SHA256, digest=b"\x07" * 32
                ),
                metadata=(("x-request-id", "nobody-1"),),
                timeout=10,
            )
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        d.channel.close()
        d.stop()
    rec = next(r for r in records(tmp_path) if r.get("request_id") == "nobody-1")
    assert rec["identity"] == {"kind": "unauthenticated"}
    assert (rec["outcome"], rec["status"]) == ("refused", "UNAUTHENTICATED")


def _watch_health(d: Running) -> list[int]:
    seen: list[int] = []

    def run() -> None:
        try:
            for r in d.health.Watch(health_pb2.HealthCheckRequest(service="")):
                seen.append(int(r.status))
        except grpc.RpcError:
            pass

    threading.Thread(target=run, daemon=True).start()
    time.sleep(0.3)
    return seen


def test_audit_on_dev_full_fails_closed_and_recovers(audit_token: TokenDir, tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    (audit_dir / "audit-1.jsonl").symlink_to("/dev/full")
    d = start(audit_config(tmp_path, audit_token), tmp_path)
    try:
        with pytest.raises(grpc.RpcError) as e:
            d.sign()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit" in (e.value.details() or "")
        assert d.status() == NOT_SERVING
        assert d.status("hsmsign.v1.Signer") == NOT_SERVING
        (audit_dir / "audit-1.jsonl").unlink()
        d.wait_status(SERVING)
        d.sign(request_id="after-recovery")
    finally:
        d.stop()
    assert any(r.get("request_id") == "after-recovery" for r in records(tmp_path))
    assert verify(tmp_path).returncode == 0


def test_audit_file_removed_under_the_daemon(audit_token: TokenDir, tmp_path: Path) -> None:
    d = start(audit_config(tmp_path, audit_token), tmp_path)
    try:
        d.sign(request_id="before")
        seen = _watch_health(d)
        (tmp_path / "audit" / "audit-1.jsonl").unlink()
        with pytest.raises(grpc.RpcError) as e:
            d.sign(request_id="withheld")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        d.wait_status(SERVING)
        d.sign(request_id="after")
        time.sleep(0.3)
        assert NOT_SERVING in seen and seen[-1] == SERVING
    finally:
        d.stop()
    recs = records(tmp_path)
    assert recs[0]["op"] == "audit_resumed" and "gone" in recs[0]["detail"]["after"]
    assert any(r.get("request_id") == "after" for r in recs)
    # The removed file held the chain's start: the verifier says records are missing.
    v = verify(tmp_path)
    assert v.returncode == 3 and "missing" in v.stdout


def test_read_only_audit_directory_fails_closed_then_recovers(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) not installed")
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    audit_dir.chmod(0o500)
    # Root ignores file modes (DESIGN fact 10): drop the capabilities that let it.
    drop = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all")
    d = start(audit_config(tmp_path, audit_token), tmp_path, prefix=drop)
    try:
        with pytest.raises(grpc.RpcError) as e:
            d.sign()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert d.status() == NOT_SERVING
        audit_dir.chmod(0o700)
        d.wait_status(SERVING)
        d.sign(request_id="writable-again")
    finally:
        audit_dir.chmod(0o700)
        d.stop()
    assert any(r.get("request_id") == "writable-again" for r in records(tmp_path))


def test_sigkill_under_load_loses_no_answered_record(audit_token: TokenDir, tmp_path: Path) -> None:
    config = audit_config(tmp_path, audit_token)
    d = start(config, tmp_path)
    answered: list[str] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            rid = uuid.uuid4().hex
            try:
                d.sign(request_id=rid)
                answered.append(rid)
            except grpc.RpcError:
                return  # the daemon is gone

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(answered) < 300 and time.monotonic() < deadline:
        time.sleep(0.05)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(answered) >= 100
    again = start(config, tmp_path)
    again.sign(request_id="after-restart")
    again.stop()
    ids = {r.get("request_id") for r in records(tmp_path)}
    assert set(answered) <= ids
    v = verify(tmp_path)
    assert v.returncode == 0, v.stdout


def test_stderr_to_a_pipe_nobody_reads_does_not_stall_serving(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    read_end, write_end = os.pipe()
    try:
        d = start(audit_config(tmp_path, audit_token), tmp_path, stderr=write_end)
        try:
            for i in range(1500):  # the pipe (64 KiB) fills after about 500 access lines
                d.sign(request_id=f"pipe-{i}")
        finally:
            d.stop()
    finally:
        os.close(read_end)
        os.close(write_end)
    ids = {r.get("request_id") for r in records(tmp_path)}
    assert {f"pipe-{i}" for i in range(1500)} <= ids


def test_stderr_on_dev_full_keeps_serving_and_auditing(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    with open("/dev/full", "wb") as full:
        d = start(audit_config(tmp_path, audit_token), tmp_path, stderr=full)
        try:
            for i in range(200):
                d.sign(request_id=f"full-{i}")
        finally:
            d.stop()
    ids = {r.get("request_id") for r in records(tmp_path)}
    assert {f"full-{i}" for i in range(200)} <= ids
    assert verify(tmp_path).returncode == 0


def _pki(tmp: Path) -> None:
    """ca.crt, server.crt/.key (localhost, 127.0.0.1) and agent.crt/.key (build-agent-1)."""
    ca = make_ca("audit test CA")
    ca.write(tmp / "ca")
    make_leaf(ca, "localhost", server=True).write(tmp / "server")
    make_leaf(ca, "build-agent-1").write(tmp / "agent")


def test_the_client_certificate_names_the_caller(audit_token: TokenDir, tmp_path: Path) -> None:
    _pki(tmp_path)
    policy = (
        f'[[identities.mtls]]\nname = "agents"\nca = "{tmp_path / "ca.crt"}"\n'
        'subject_cn = "build-agent-1"\n'
        '[[policy.grant]]\nidentities = ["agents"]\nkeys = ["demo"]\noperations = ["sign_digest"]\n'
    )
    config = audit_config(tmp_path, audit_token, policy=policy)
    config.write_text(
        config.read_text()
        + f'\n[server.tls]\ncert = "{tmp_path / "server.crt"}"\n'
        + f'key = "{tmp_path / "server.key"}"\nclient_ca = "{tmp_path / "ca.crt"}"\n'
    )
    d = start(config, tmp_path)
    try:
        creds = grpc.ssl_channel_credentials(
            (tmp_path / "ca.crt").read_bytes(),
            (tmp_path / "agent.key").read_bytes(),
            (tmp_path / "agent.crt").read_bytes(),
        )
        with grpc.secure_channel(d.address, creds) as channel:
            pb_grpc.SignerStub(channel).SignDigest(
                pb.SignDigestRequest(
                    key=pb.KeyRef(name="demo"), algorithm=SHA256, digest=b"\x07" * 32
                ),
                metadata=(("x-request-id", "tls-1"),),
                timeout=10,
            )
    finally:
        d.channel.close()
        d.stop()
    rec = next(r for r in records(tmp_path) if r.get("request_id") == "tls-1")
    assert rec["identity"] == {
        "kind": "mtls",
        "name": "agents",
        "subject": "subject_cn build-agent-1",
        "issuer": "CN=audit test CA",
    }


def test_a_destruction_the_daemon_carries_out_is_recorded(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    config = audit_config(tmp_path, audit_token)
    config.write_text(
        config.read_text()
        + "\n[keyring]\nrefresh_seconds = 0.5\nmin_destruction_delay_hours = 0\n"
        + "dev_unsafe_allow_short_destruction_delay = true\n"
    )
    d = start(config, tmp_path)
    name = f"doomed-{uuid.uuid4().hex[:6]}"
    try:
        d.admin.CreateKey(
            pb.CreateKeyRequest(
                name=name, purpose=pb.KEY_PURPOSE_SIGN, algorithm=pb.KEY_ALGORITHM_RSA_2048
            ),
            timeout=60,
        )
        d.admin.RotateKey(pb.RotateKeyRequest(name=name, make_primary=True), timeout=60)
        request = pb.ScheduleDestructionRequest(name=name, version=1)
        request.delay.FromSeconds(1)
        d.admin.ScheduleKeyVersionDestruction(request, timeout=30)
        deadline = time.monotonic() + 30
        while not any(
            r.get("op") == "DestroyKeyVersion" and r.get("key") == name for r in records(tmp_path)
        ):
            assert time.monotonic() < deadline, "no destruction record"
            time.sleep(0.2)
    finally:
        d.stop()
    ops = [
        (r["op"], r.get("key"), r.get("version")) for r in records(tmp_path) if r.get("key") == name
    ]
    assert ("CreateKey", name, 1) in ops and ("ScheduleKeyVersionDestruction", name, 1) in ops
    destroyed = next(r for r in records(tmp_path) if r.get("op") == "DestroyKeyVersion")
    assert destroyed["kind"] == "event" and destroyed["version"] == 1
    assert verify(tmp_path).returncode == 0


def test_a_full_disk_fails_closed_and_recovers_with_a_clean_chain(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(audit_dir)],
        capture_output=True,
        timeout=30,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        d = start(audit_config(tmp_path, audit_token), tmp_path)
        try:
            d.sign(request_id="before-full")
            filler = audit_dir / "filler"
            with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
            refused = 0
            for i in range(200):  # the chain file's last page may take a few records first
                try:
                    d.sign(request_id=f"while-full-{i}")
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE
                    refused += 1
                    break
            assert refused == 1
            assert d.status() == NOT_SERVING
            filler.unlink()
            d.wait_status(SERVING)
            d.sign(request_id="after-full")
        finally:
            d.stop()
        ids = {r.get("request_id") for r in records(tmp_path)}
        assert {"before-full", "after-full"} <= ids
        v = verify(tmp_path)
        assert v.returncode == 0, v.stdout
    finally:
        subprocess.run(["umount", str(audit_dir)], capture_output=True, timeout=30)


def test_a_call_the_client_abandoned_is_recorded_as_abandoned(
    running: Running, tmp_path: Path
) -> None:
    digests = [os.urandom(32) for _ in range(2000)]  # a second or more of signing
    with pytest.raises(grpc.RpcError) as e:
        running.signer.SignDigests(
            pb.SignDigestsRequest(key=pb.KeyRef(name="demo"), algorithm=SHA256, digests=digests),
            metadata=(("x-request-id", "gave-up"),),
            timeout=0.2,
        )
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while not any(r.get("request_id") == "gave-up" for r in records(tmp_path)):
        assert time.monotonic() < deadline, "no record of the abandoned call"
        time.sleep(0.2)
    rec = next(r for r in records(tmp_path) if r.get("request_id") == "gave-up")
    # The batch stops between chunks once its caller's deadline passed (DEADLINE_EXCEEDED);
    # if its last chunk was already signing, the record says the answer was never delivered.
    # Either way it is never a plain "ok".
    assert (rec["outcome"], rec["status"]) in (
        ("error", "DEADLINE_EXCEEDED"),
        ("abandoned", "OK"),
    ), rec


def test_files_rotate_by_time_and_the_chain_verifies_across_them(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    d = start(audit_config(tmp_path, audit_token, audit='rotate_every = "1s"'), tmp_path)
    try:
        for i in range(3):
            d.sign(request_id=f"timed-{i}")
            time.sleep(1.2)  # the file's first record is over a second old: the next rotates
        d.sign(request_id="timed-last")
    finally:
        d.stop()
    rotated = sorted((tmp_path / "audit").glob("audit-1.0*.jsonl"))
    assert len(rotated) >= 3, rotated
    ids = {r.get("request_id") for r in records(tmp_path)}
    assert {"timed-0", "timed-1", "timed-2", "timed-last"} <= ids
    v = verify(tmp_path)
    assert v.returncode == 0, v.stdout
    rotated[1].unlink()  # a whole rotated file dropped: named as missing records
    v = verify(tmp_path)
    assert v.returncode == 3 and "rotated file dropped" in v.stdout


def test_no_signer_or_key_admin_call_can_reach_the_audit_key(
    audit_token: TokenDir, tmp_path: Path
) -> None:
    """The audit key signs checkpoints and nothing else (server/audit/signing.py): it is not
    in the key ring, whatever a call names it by (label, fingerprint, Capgo key_id), and its
    private key may only sign."""
    d = start(audit_config(tmp_path, audit_token), tmp_path)
    try:
        pub = load_pem_public_key((tmp_path / "audit" / "audit-key.pem").read_bytes())
        assert isinstance(pub, rsa.RSAPublicKey)
        refs = [
            pb.KeyRef(name="hsmsign-audit:v1"),
            pb.KeyRef(name="hsmsign-audit"),
            pb.KeyRef(fingerprint=keyformats.fingerprint(pub)),
            pb.KeyRef(capgo_key_id=keyformats.capgo_key_id(pub)),
        ]
        answers: list[tuple[object, str]] = []
        for ref in refs:
            for call in (
                lambda r=ref: d.signer.SignDigest(
                    pb.SignDigestRequest(key=r, algorithm=SHA256, digest=b"\x02" * 32), timeout=10
                ),
                lambda r=ref: d.signer.GetPublicKey(pb.GetPublicKeyRequest(key=r), timeout=10),
            ):
                try:
                    call()
                    answers.append((ref, "OK"))
                except grpc.RpcError as e:
                    answers.append((ref, e.code().name))
        for name in ("hsmsign-audit:v1", "hsmsign-audit"):
            for rpc in (d.admin.DisableKeyVersion, d.admin.ScheduleKeyVersionDestruction):
                request: Any = (
                    pb.KeyVersionRequest(name=name, version=1)
                    if rpc is d.admin.DisableKeyVersion
                    else pb.ScheduleDestructionRequest(name=name, version=1)
                )
                try:
                    rpc(request, timeout=10)
                    answers.append((name, "OK"))
                except grpc.RpcError as e:
                    answers.append((name, e.code().name))
        listed = d.admin.ListKeys(pb.ListKeysRequest(), timeout=10)
    finally:
        d.stop()
    reached = [a for a in answers if a[1] not in ("NOT_FOUND", "INVALID_ARGUMENT")]
    assert not reached, (
        f"calls that reached the audit key, or answered other than not found: {reached}"
    )
    fingerprints = {v.fingerprint for k in listed.keys for v in k.versions}
    assert keyformats.fingerprint(pub) not in fingerprints
    listing = audit_token.pkcs11_tool("-O")
    blocks = [
        b.split("Object;", 1)[0]
        for b in listing.split("Private Key Object;")[1:]
        if "label:      hsmsign-audit:v1\n" in b.split("Object;", 1)[0]
    ]
    assert len(blocks) == 1, listing
    usage = blocks[0].split("Usage:", 1)[1].split("\n", 1)[0]
    assert usage.split() == ["sign"], usage
    assert verify(tmp_path).returncode == 0


def test_audit_file_replaced_under_the_daemon(audit_token: TokenDir, tmp_path: Path) -> None:
    """Another file renamed over the chain's file: the write fails closed (the path no longer
    names the file the daemon has open), and the daemon recovers by itself."""
    d = start(audit_config(tmp_path, audit_token), tmp_path)
    try:
        d.sign(request_id="before")
        chain = tmp_path / "audit" / "audit-1.jsonl"
        impostor = chain.with_name("impostor")
        impostor.write_text(chain.read_text())
        os.replace(impostor, chain)
        with pytest.raises(grpc.RpcError) as e:
            d.sign(request_id="withheld")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        d.wait_status(SERVING)
        d.sign(request_id="after")
    finally:
        d.stop()
    log = (tmp_path / "daemon.log").read_text()
    assert "replaced" in log, log[-2000:]
    ids = [r.get("request_id") for r in records(tmp_path)]
    assert "before" in ids and "after" in ids and "withheld" not in ids


def test_a_request_that_never_arrives_is_recorded(audit_token: TokenDir, tmp_path: Path) -> None:
    """A stream that opens a call and sends no body is ended after
    max_request_receive_seconds, and the call is on the trail like any refused call."""
    config = audit_config(
        tmp_path,
        audit_token,
        server="processes = 1\n[server.limits]\nmax_request_receive_seconds = 1",
    )
    d = start(config, tmp_path)
    try:
        with RawH2Connection(d.address) as h2:
            stream = h2.open_call("/hsmsign.v1.Signer/SignDigest")
            assert h2.wait_ended([stream], 10), "the stalled call was never ended"
        d.sign(request_id="after")  # the record before it is written by then
    finally:
        d.stop()
    stalled = [
        r
        for r in records(tmp_path)
        if r.get("op") == "SignDigest" and r.get("request_id") != "after"
    ]
    assert [r["status"] for r in stalled] == ["DEADLINE_EXCEEDED"], stalled
