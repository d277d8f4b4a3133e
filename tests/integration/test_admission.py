"""Admission control against a real daemon: one identity's abuse does not starve another.

Two mTLS identities with the same grants call one serving process. The abuser (a) keeps 400
streams open on one connection, or (b) sends four 10,000-digest batches; meanwhile the other
identity's calls must be served within a generous deadline (5 s: a bound that holds on a
loaded machine, not a benchmark).
The abuser's excess is refused by hsmsignd itself, RESOURCE_EXHAUSTED with an access-log line
and an audit record each, never by gRPC ("Concurrent RPC limit exceeded!", which leaves no
trace). Every abuse is bounded in count and time and talks to loopback only.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from hsmsign.client import TlsOptions
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness import TokenDir, hsmsignd, make_token, write_config
from tests.harness.paths import HSMSIGND, REPO
from tests.harness.pki import make_ca, make_leaf

SHA256 = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256
#: What the other identity's calls must be answered within while the abuse runs.
VICTIM_DEADLINE = 5.0
#: gRPC's own refusal when maximum_concurrent_rpcs is reached (no log line, no audit record).
GRPC_SHED_TEXT = "Concurrent RPC limit exceeded"

POLICY = """
[[identities.mtls]]
name = "abuser"
ca = "{tmp}/ca.crt"
subject_cn = "abuser"
[[identities.mtls]]
name = "victim"
ca = "{tmp}/ca.crt"
subject_cn = "victim"
[[policy.grant]]
identities = ["abuser", "victim"]
keys = ["*"]
operations = ["*"]
"""


@pytest.fixture(scope="module")
def admission_token(tmp_path_factory: pytest.TempPathFactory) -> TokenDir:
    """A token of this module's own (its audit key is made by the first daemon)."""
    t = make_token(tmp_path_factory.mktemp("admission-token"))
    hsmsignd(write_config(t.path / "plain.toml", t), "keys", "create", "demo")
    return t


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    address: str
    tmp: Path

    def channel(self, who: str) -> grpc.Channel:
        tls = TlsOptions(self.tmp / "ca.crt", self.tmp / f"{who}.crt", self.tmp / f"{who}.key")
        return grpc.secure_channel(self.address, tls.credentials())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return (self.tmp / "daemon.log").read_text(errors="replace")

    def audit_records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for f in sorted((self.tmp / "audit").glob("audit-*.jsonl")):
            if ".checkpoints." not in f.name:
                out += [json.loads(line) for line in f.read_text().splitlines()]
        return [r for r in out if r.get("kind") == "call"]


@pytest.fixture()
def daemon(admission_token: TokenDir, tmp_path: Path) -> Iterator[Daemon]:
    ca = make_ca("admission test CA")
    ca.write(tmp_path / "ca")
    make_leaf(ca, "localhost", server=True).write(tmp_path / "server")
    for who in ("abuser", "victim"):
        make_leaf(ca, who).write(tmp_path / who)
    config = write_config(
        tmp_path / "hsmsignd.toml", admission_token, policy=POLICY.format(tmp=tmp_path)
    )
    config.write_text(
        config.read_text()
        + f"""
[server]
processes = 1
[server.tls]
cert = "{tmp_path / "server.crt"}"
key = "{tmp_path / "server.key"}"
client_ca = "{tmp_path / "ca.crt"}"
[audit]
path = "{tmp_path / "audit"}"
"""
    )
    ready = tmp_path / "ready.json"
    log = open(tmp_path / "daemon.log", "ab")  # noqa: SIM115  (kept by the subprocess)
    proc = subprocess.Popen(
        [
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
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError((tmp_path / "daemon.log").read_text(errors="replace"))
        time.sleep(0.05)
    d = Daemon(proc, json.loads(ready.read_text())["address"], tmp_path)
    try:
        yield d
    finally:
        d.stop()


@dataclass
class VictimCalls:
    """The other identity's unary calls, one after another, while the abuse runs."""

    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def run(self, channel: grpc.Channel, running: Callable[[], bool]) -> None:
        stub = pb_grpc.SignerStub(channel)
        request = pb.SignDigestRequest(
            key=pb.KeyRef(name="demo"), algorithm=SHA256, digest=b"\x02" * 32
        )
        while running():
            t0 = time.perf_counter()
            try:
                stub.SignDigest(request, timeout=VICTIM_DEADLINE)
                self.latencies.append(time.perf_counter() - t0)
            except grpc.RpcError as e:
                self.failures.append(f"{e.code().name}: {e.details()}")
            time.sleep(0.05)

    def report(self, what: str) -> str:
        lat = sorted(self.latencies)
        if not lat:
            return f"{what}: no call served; failures {Counter(self.failures).most_common(3)}"
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (
            f"{what}: {len(lat)} served, p50 {statistics.median(lat) * 1000:.0f} ms, "
            f"p99 {p99 * 1000:.0f} ms; {len(self.failures)} failed "
            f"{Counter(f.split(':')[0] for f in self.failures).most_common()}"
        )


def _warm(d: Daemon, who: str) -> grpc.Channel:
    channel = d.channel(who)
    pb_grpc.SignerStub(channel).GetPublicKey(
        pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")), timeout=30
    )
    return channel


def _access_lines(log: str, status: str) -> list[str]:
    return re.findall(rf"hsmsign\.access: \w+ peer=\S+ status={status}\b.*", log)


def test_many_streams_from_one_identity_leave_room_for_another(daemon: Daemon) -> None:
    streams, abuse_seconds = 400, 8.0
    victim_channel = _warm(daemon, "victim")
    tmp = daemon.tmp
    # The abuser is a process of its own: its threads must not slow the measured caller's.
    files = [str(tmp / name) for name in ("ca.crt", "abuser.crt", "abuser.key")]
    abuser = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.harness.abuse",
            daemon.address,
            *files,
            f"{streams}",
            f"{abuse_seconds}",
        ],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    time.sleep(2.0)  # its imports done and its streams open
    victim = VictimCalls()
    stop_at = time.monotonic() + abuse_seconds - 3.0
    victim.run(victim_channel, lambda: abuser.poll() is None and time.monotonic() < stop_at)
    out, _ = abuser.communicate(timeout=abuse_seconds + 180)
    assert abuser.returncode == 0
    outcomes: dict[str, int] = json.loads(out)
    victim_channel.close()
    log = daemon.stop()
    print(victim.report(f"{streams} streams"), {o[:60]: n for o, n in outcomes.items()})

    assert not victim.failures, victim.report("victim")
    assert victim.latencies
    refused = {o: n for o, n in outcomes.items() if o.startswith("RESOURCE_EXHAUSTED")}
    assert not [o for o in outcomes if GRPC_SHED_TEXT in o], outcomes
    assert set(outcomes) - set(refused) == {"OK"}, outcomes
    shed = sum(refused.values())
    assert shed > 0, "400 streams fitted in the queue: the test no longer abuses"
    # Every refusal is hsmsignd's own: an access-log line and an audit record each.
    assert len(_access_lines(log, "RESOURCE_EXHAUSTED")) == shed
    audited = [r for r in daemon.audit_records() if r["status"] == "RESOURCE_EXHAUSTED"]
    assert len(audited) == shed
    assert {r["identity"]["name"] for r in audited} == {"abuser"}
    assert re.search(rf"admission: {shed} calls? shed", log), log[-2000:]


def test_big_batches_from_one_identity_leave_room_for_another(daemon: Daemon) -> None:
    batches, size = 4, 10_000
    abuser, victim_channel = _warm(daemon, "abuser"), _warm(daemon, "victim")
    stub = pb_grpc.SignerStub(abuser)
    digests = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(size)]
    request = pb.SignDigestsRequest(key=pb.KeyRef(name="demo"), algorithm=SHA256, digests=digests)
    calls = [stub.SignDigests.future(request, timeout=300) for _ in range(batches)]
    victim = VictimCalls()
    victim.run(victim_channel, lambda: not all(c.done() for c in calls))
    signed: list[int | str] = []
    for c in calls:
        try:
            signed.append(len(c.result().signatures))
        except grpc.RpcError as e:
            signed.append(f"{e.code().name}: {e.details()}")
    abuser.close()
    victim_channel.close()
    daemon.stop()
    print(victim.report(f"{batches} batches of {size}"), signed)

    assert signed == [size] * batches
    assert not victim.failures, victim.report("victim")
    assert victim.latencies
