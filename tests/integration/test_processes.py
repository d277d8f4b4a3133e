"""Several serving processes behind one port (server.processes, server/supervisor.py):
connections spread over them, a key-ring change reaches all of them before the change's
response returns, a dead process is replaced, and start-up errors are still one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_der_public_key

from hsmsign.admin import KeyAdmin
from hsmsign.client import Client
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.conftest import (
    HSMSIGND,
    Daemon,
    TokenDir,
    hsmsignd,
    start_daemon,
    write_config,
)
from tests.harness.tokens import token_with_keys

DIGEST = hashlib.sha256(b"hsmsign processes").digest()


def _ready(d: Daemon) -> dict[str, object]:
    data: dict[str, object] = json.loads((d.tmp / "ready.json").read_text())
    return data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _sign_on_new_connection(address: str, key: str, version: int = 0) -> pb.SignDigestResponse:
    """One call on a connection of its own (no subchannel shared with earlier channels), as a
    separate build agent would make it; the kernel picks the serving process."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        resp: pb.SignDigestResponse = pb_grpc.SignerStub(ch).SignDigest(
            pb.SignDigestRequest(
                key=pb.KeyRef(name=key, version=version),
                algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
                digest=DIGEST,
            ),
            timeout=30,
        )
        return resp


@pytest.fixture(scope="module")
def ring_token(tmp_path_factory: pytest.TempPathFactory) -> TokenDir:
    """A token of its own, with a sign key 'demo': these tests rotate and disable keys."""
    t, _config = token_with_keys(
        tmp_path_factory.mktemp("proc-token"), ["demo"], label="hsmsign-procs"
    )
    return t


@pytest.fixture(scope="module")
def two(ring_token: TokenDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # An hour between timed refreshes: only the shared change counter can make a change made
    # through one process visible in the other within these tests.
    tmp = tmp_path_factory.mktemp("two")
    cfg = write_config(
        tmp / "c.toml",
        ring_token,
        extra="[server]\nprocesses = 2\n[keyring]\nrefresh_seconds = 3600\n",
    )
    d = start_daemon(cfg, tmp / "d")
    yield d
    d.stop()


def test_both_processes_serve_one_port(two: Daemon) -> None:
    ready = _ready(two)
    workers = ready["workers"]
    assert isinstance(workers, list) and len(workers) == 2
    assert ready["pid"] == two.proc.pid and all(_alive(p) for p in workers)
    two.wait_log("2 serving processes")
    seen: set[str] = set()
    for _ in range(64):
        resp = _sign_on_new_connection(two.address, "demo")
        assert resp.key.name == "demo" and len(resp.signature) == 256
        seen = set(re.findall(r"INFO \[(\d)/2\] hsmsign\.access: SignDigest ", two.log()))
        if seen == {"1", "2"}:
            break
    # 64 connections all hashed to one process: odds about 1 in 10^19.
    assert seen == {"1", "2"}, "the kernel did not spread connections over both processes"


def test_a_ring_change_reaches_every_process_before_its_response(two: Daemon) -> None:
    with Client(two.address) as client:
        admin = KeyAdmin(client)
        admin.create_key("shared")
        first = {_sign_on_new_connection(two.address, "shared").key.version for _ in range(8)}
        assert first == {1}
        admin.rotate_key("shared", make_primary=True)
        # Every call after the rotation's response, whichever process it reaches, uses v2.
        after = [_sign_on_new_connection(two.address, "shared") for _ in range(16)]
        assert {r.key.version for r in after} == {2}
        with grpc.insecure_channel(two.address) as ch:
            der = (
                pb_grpc.SignerStub(ch)
                .GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(name="shared", version=2)))
                .spki_der
            )
        pub = load_der_public_key(der)
        assert isinstance(pub, rsa.RSAPublicKey)
        for r in after[:3]:
            pub.verify(r.signature, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        admin.set_primary("shared", 1)
        assert {_sign_on_new_connection(two.address, "shared").key.version for _ in range(16)} == {
            1
        }
        admin.disable("shared", 2)
        for _ in range(16):
            with pytest.raises(grpc.RpcError) as e:
                _sign_on_new_connection(two.address, "shared", version=2)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_a_dead_process_is_replaced(two: Daemon) -> None:
    workers = _ready(two)["workers"]
    assert isinstance(workers, list)
    victim = int(workers[0])
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = _ready(two)["workers"]
        assert isinstance(now, list)
        if (
            victim not in now
            and len(now) == 2
            and "1/2] hsmsignd: serving process 1/2 ready"
            in (two.log().split("exited with signal SIGKILL")[-1])
        ):
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"no replacement within 30 s:\n{two.log()[-3000:]}")
    assert f"serving process 1/2 (pid {victim}) exited with signal SIGKILL" in two.log()
    assert two.proc.poll() is None
    for _ in range(16):
        assert _sign_on_new_connection(two.address, "demo").key.name == "demo"


def test_killing_the_supervisor_ends_the_serving_processes(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token, extra="[server]\nprocesses = 2\n")
    d = start_daemon(cfg, tmp_path / "d")
    workers = _ready(d)["workers"]
    assert isinstance(workers, list)
    d.proc.kill()
    d.proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(int(p)) for p in workers):
        assert time.monotonic() < deadline, "serving processes outlived their supervisor"
        time.sleep(0.2)


def test_sigterm_stops_every_process(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", token, extra="[server]\nprocesses = 3\n")
    d = start_daemon(cfg, tmp_path / "d")
    workers = _ready(d)["workers"]
    assert isinstance(workers, list) and len(workers) == 3
    assert _sign_on_new_connection(d.address, "demo").key.name == "demo"
    assert d.stop(signal.SIGTERM) == 0
    assert not any(_alive(int(p)) for p in workers)
    assert "SIGTERM received: draining in-flight calls in 3 serving processes" in d.log()


def test_start_up_errors_are_one_line_and_one_login(token: TokenDir, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("wrong-pin-4711")
    pin.chmod(0o600)
    cfg = write_config(
        tmp_path / "c.toml",
        token,
        pin_line=f'pin_file = "{pin}"',
        extra="[server]\nprocesses = 4\n",
    )
    r = hsmsignd(cfg, check=False, timeout=60)
    assert r.returncode == 77  # PinRefused: never restarted (docs/operations.md)
    # The supervisor checks the token once before starting anything: one line, one attempt.
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("hsmsignd:")] == [
        ln for ln in r.stderr.splitlines() if "refused the PIN" in ln
    ]
    assert r.stderr.count("refused the PIN") == 1
    assert "serving process" not in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_with_several_processes(
    token: TokenDir, daemon: Daemon, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "c.toml", token, extra="[server]\nprocesses = 2\n")
    r = hsmsignd(cfg, "serve", "--listen", daemon.address, check=False, timeout=60)
    assert r.returncode == 1
    assert f"cannot listen on {daemon.address} (in use" in r.stderr


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("0", "server.processes: got 0"),
        ('"many"', "server.processes: got 'many'"),
        ("true", "server.processes: got True"),
        ("65", "server.processes: got 65"),
    ],
)
def test_bad_processes_value(token: TokenDir, tmp_path: Path, value: str, words: str) -> None:
    cfg = write_config(tmp_path / "c.toml", token, extra=f"[server]\nprocesses = {value}\n")
    r = hsmsignd(cfg, check=False, timeout=60)
    assert r.returncode == 2
    assert (
        words in r.stderr and '"auto" (one per CPU, at most 8) or a number from 1 to 64' in r.stderr
    )


def test_auto_follows_the_cpus_the_daemon_may_use(token: TokenDir, tmp_path: Path) -> None:
    """processes = "auto" (the default) counts the CPU affinity mask: under `taskset -c 0`
    the daemon serves from one process, with no supervisor."""
    cfg = write_config(tmp_path / "c.toml", token)
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            HSMSIGND,
            "--config",
            str(cfg),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        assert "workers" not in info and info["pid"] == proc.pid
        assert _sign_on_new_connection(info["address"], "demo").key.name == "demo"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "serving processes" not in err and "listening on" in err


def test_a_version_destroyed_behind_a_daemons_back_reads_as_destroyed(
    ring_token: TokenDir, tmp_path: Path
) -> None:
    """An offline ceremony destroys a version while a daemon (no timed refresh for an hour)
    still has it as enabled: the daemon's next call finds the object gone in the token,
    re-reads the ring and answers FAILED_PRECONDITION (destroyed), not NOT_FOUND."""
    cfg = write_config(
        tmp_path / "c.toml",
        ring_token,
        extra="[server]\nprocesses = 1\n[keyring]\nrefresh_seconds = 3600\n"
        "min_destruction_delay_hours = 0\ndev_unsafe_allow_short_destruction_delay = true\n",
    )
    hsmsignd(cfg, "keys", "create", "behind")
    hsmsignd(cfg, "keys", "rotate", "behind")
    d = start_daemon(cfg, tmp_path / "d")
    try:
        assert _sign_on_new_connection(d.address, "behind", version=1).key.version == 1
        hsmsignd(cfg, "keys", "schedule-destroy", "behind", "1", "--delay", "0s")
        with pytest.raises(grpc.RpcError) as e:
            _sign_on_new_connection(d.address, "behind", version=1)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "destroyed" in (e.value.details() or "")
        assert _sign_on_new_connection(d.address, "behind").key.version == 2
    finally:
        d.stop()
