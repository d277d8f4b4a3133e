"""``hsmsignd keys`` on the audit trail: every offline key change is recorded write-ahead on
the ``offline`` chain (intent, change, outcome), signed like the daemon's chains; a trail that
cannot be written stops the change; a daemon serving on the same trail and ceremonies running
beside it leave chains that all verify."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness import HSMSIGN, TokenDir, hsmsignd, make_token, start_daemon, write_config

SHA256 = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256
SHORT_DESTRUCTION = (
    "\n[keyring]\nmin_destruction_delay_hours = 0\n"
    "dev_unsafe_allow_short_destruction_delay = true\n"
)


def audited_config(tmp: Path, token: TokenDir, server: str = "processes = 1") -> Path:
    path = write_config(tmp / "audited.toml", token)
    path.write_text(
        path.read_text()
        + SHORT_DESTRUCTION
        + f'\n[server]\n{server}\n\n[audit]\npath = "{tmp / "audit"}"\n'
    )
    return path


def records(tmp: Path, chain: str | None = None) -> list[dict[str, Any]]:
    out = []
    for f in sorted((tmp / "audit").glob("audit-*.jsonl")):
        if ".checkpoints." not in f.name:
            out += [json.loads(line) for line in f.read_text().splitlines()]
    return [r for r in out if chain is None or r["chain"] == chain]


def verify(tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HSMSIGN, "audit", "verify", str(tmp / "audit"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _key_file(tmp: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp / "import.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def test_every_offline_change_is_recorded_write_ahead_and_verifies(tmp_path: Path) -> None:
    token = make_token(tmp_path / "token")
    config = audited_config(tmp_path, token)
    name = "ceremony"
    steps: list[tuple[str, tuple[str, ...], int | None]] = [
        ("CreateKey", ("create", name), 1),
        ("RotateKey", ("rotate", name), 2),
        ("DisableKeyVersion", ("disable", name, "1"), 1),
        ("EnableKeyVersion", ("enable", name, "1"), 1),
        ("SetPrimaryVersion", ("set-primary", name, "1"), 1),
        ("SetPrimaryVersion", ("set-primary", name, "2"), 2),
        ("ImportKey", ("import", str(_key_file(tmp_path)), "--name", name), 3),
        ("ScheduleKeyVersionDestruction", ("schedule-destroy", name, "3", "--delay", "1h"), 3),
        ("CancelKeyVersionDestruction", ("cancel-destroy", name, "3"), 3),
        ("ScheduleKeyVersionDestruction", ("schedule-destroy", name, "1", "--delay", "1s"), 1),
    ]
    for _op, args, _version in steps:
        hsmsignd(config, "keys", *args)
    time.sleep(1.5)
    listed = hsmsignd(config, "keys", "list", "--json")  # carries out the due destruction
    assert any(
        v["version"] == 1 and v["state"] == "destroyed" for v in json.loads(listed.stdout)
    ), listed.stdout

    recs = records(tmp_path, "offline")
    calls = [r for r in recs if r["kind"] == "call"]
    assert len(calls) == 2 * len(steps), [(r["op"], r["outcome"]) for r in calls]
    user = pwd.getpwuid(os.getuid()).pw_name
    for (op, _args, version), intent, outcome in zip(steps, calls[::2], calls[1::2], strict=True):
        assert (intent["op"], intent["outcome"]) == (op, "intent"), intent
        assert (outcome["op"], outcome["outcome"], outcome["status"]) == (op, "ok", "OK")
        assert intent["request_id"] == outcome["request_id"]
        assert intent["seq"] < outcome["seq"]
        assert (outcome["key"], outcome["version"]) == (name, version)
        assert len(outcome["fingerprint"]) == 64
        assert outcome["identity"]["kind"] == "os_user"
        assert outcome["identity"]["subject"] == f"uid={os.getuid()}({user})"
        assert outcome["peer"].startswith("offline:pid=")
    imported = next(r for r in calls if r["op"] == "ImportKey")
    assert imported["inputs"]["private_key_der"].startswith("sha256:")  # never the key
    destroyed = [r for r in recs if r["op"] == "DestroyKeyVersion"]
    assert [(r["key"], r["version"], r["kind"]) for r in destroyed] == [(name, 1, "event")]
    # Every run signed the chain at open and close: nothing is left uncovered.
    v = verify(tmp_path)
    assert v.returncode == 0, v.stdout + v.stderr
    chain = json.loads(v.stdout)["chains"][0]
    assert (chain["chain"], chain["unsigned_tail"]) == ("offline", 0)
    shown = subprocess.run(
        [HSMSIGN, "audit", "show", str(tmp_path / "audit"), "--identity", user, "--key", name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "CreateKey" in shown.stdout and "os_user:" in shown.stdout


def test_a_trail_that_cannot_be_written_stops_the_change(tmp_path: Path) -> None:
    token = make_token(tmp_path / "token")
    config = audited_config(tmp_path, token)
    hsmsignd(config, "keys", "create", "kept")
    (tmp_path / "audit" / "audit-offline.jsonl").unlink()
    (tmp_path / "audit" / "audit-offline.jsonl").symlink_to("/dev/full")
    refused = hsmsignd(config, "keys", "rotate", "kept", check=False)
    assert refused.returncode == 1, refused.stderr
    assert "audit trail" in refused.stderr and "nothing was changed" in refused.stderr
    assert refused.stderr.count("Traceback") == 0
    created = hsmsignd(config, "keys", "create", "never", check=False)
    assert created.returncode == 1
    plain = write_config(tmp_path / "plain.toml", token)  # no [audit]: the ring as it is
    keys = json.loads(hsmsignd(plain, "keys", "list", "--json").stdout)
    assert {(v["name"], v["version"]) for v in keys} == {("kept", 1)}


def test_a_daemon_and_ceremonies_beside_it_keep_chains_that_verify(tmp_path: Path) -> None:
    token = make_token(tmp_path / "token")
    config = audited_config(tmp_path, token, server="processes = 2")
    hsmsignd(config, "keys", "create", "demo")
    d = start_daemon(config, tmp_path / "daemon")
    signed: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with grpc.insecure_channel(d.address) as channel:
            stub = pb_grpc.SignerStub(channel)
            while not stop.is_set():
                rid = uuid.uuid4().hex
                stub.SignDigest(
                    pb.SignDigestRequest(
                        key=pb.KeyRef(name="demo"), algorithm=SHA256, digest=os.urandom(32)
                    ),
                    metadata=(("x-request-id", rid),),
                    timeout=30,
                )
                signed.append(rid)

    ceremonies: list[subprocess.CompletedProcess[str]] = []

    def ceremony(n: int) -> None:
        ceremonies.append(hsmsignd(config, "keys", "create", f"beside-{n}", check=False))
        ceremonies.append(hsmsignd(config, "keys", "rotate", f"beside-{n}", check=False))

    clients = [threading.Thread(target=client) for _ in range(3)]
    try:
        for t in clients:
            t.start()
        admins = [threading.Thread(target=ceremony, args=(n,)) for n in range(3)]
        for t in admins:
            t.start()
        for t in admins:
            t.join(timeout=300)
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=60)
        d.stop()
    assert [c.returncode for c in ceremonies] == [0] * 6, [c.stderr for c in ceremonies]
    assert len(signed) > 0
    v = verify(tmp_path)
    assert v.returncode == 0, v.stdout + v.stderr
    chains = {c["chain"] for c in json.loads(v.stdout)["chains"]}
    assert "offline" in chains and chains & {"1", "2"}
    ids = {r.get("request_id") for r in records(tmp_path)}
    assert set(signed) <= ids
    made = {(r["op"], r["key"]) for r in records(tmp_path, "offline") if r.get("outcome") == "ok"}
    for n in range(3):
        assert {("CreateKey", f"beside-{n}"), ("RotateKey", f"beside-{n}")} <= made
