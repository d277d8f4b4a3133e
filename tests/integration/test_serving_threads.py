"""Single calls wait for a serving thread, not on one (docs/adr/0009-fair-serving-threads.md).

Before, every call in flight had a thread of its own that slept until a token session came
free: 64 callers meant about 64 threads, each woken once per call, and unary signing cost
the daemon 2.0 ms of CPU per call instead of 1.3. Now the calls wait as jobs and
``server.threads`` threads take them in turn; the test holds 64 calls in flight at the token
(injected latency over the real token, tests/harness/faults.py) and counts the serving
process's threads. Loopback only, 64 calls.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness.daemons import start_daemon
from tests.harness.faults import launcher, write_plan
from tests.harness.tokens import token_with_keys

CALLERS = 64
THREADS = 4
LATENCY_SECONDS = 0.05  # per signature; 2 sessions: the 64 calls take about 1.6 s


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no thread count for {pid}")


def test_calls_in_flight_wait_for_a_serving_thread_not_on_one(tmp_path: Path) -> None:
    _token, config = token_with_keys(
        tmp_path / "t",
        ["demo"],
        extra=f"[server]\nprocesses = 1\nthreads = {THREADS}\n",
    )
    plan = tmp_path / "plan.json"
    write_plan(plan)
    d = start_daemon(config, tmp_path / "d", command=launcher(plan))
    digests = [hashlib.sha256(i.to_bytes(2, "big")).digest() for i in range(CALLERS)]
    try:
        with grpc.insecure_channel(d.address) as ch:
            stub = pb_grpc.SignerStub(ch)
            pem = stub.GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")), timeout=30)
            stub.SignDigest(_request(digests[0]), timeout=30)  # warm: session open, key found
            idle = _threads(d.proc.pid)
            write_plan(plan, {"call": "sign", "latency_seconds": LATENCY_SECONDS})
            most = idle
            done = threading.Event()

            def sample() -> None:
                nonlocal most
                while not done.is_set():
                    most = max(most, _threads(d.proc.pid))
                    time.sleep(0.01)

            sampler = threading.Thread(target=sample)
            sampler.start()
            calls = [stub.SignDigest.future(_request(x), timeout=60) for x in digests]
            answers = [c.result() for c in calls]
            done.set()
            sampler.join()
    finally:
        d.stop()

    key = serialization.load_pem_public_key(pem.spki_pem.encode())
    assert isinstance(key, rsa.RSAPublicKey)
    for digest, answer in zip(digests, answers, strict=True):
        key.verify(answer.signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    # The serving threads are started with the process; a few more may come and go
    # (the session pool's, the batch helpers'), but not one per call in flight.
    assert most - idle <= THREADS, (
        f"{CALLERS} calls in flight took the serving process from {idle} to {most} threads"
    )


def test_a_call_whose_caller_goes_while_it_waits_for_a_thread_never_runs_and_is_logged(
    tmp_path: Path,
) -> None:
    """One serving thread, held at the token: a second call waits as a job; its caller's
    deadline passes; it leaves the queue unrun (no signature for a caller who has gone) and
    its refusal is still on the access log, like any call."""
    hold = 2.0
    _token, config = token_with_keys(
        tmp_path / "t", ["demo"], extra="[server]\nprocesses = 1\nthreads = 1\n"
    )
    plan = tmp_path / "plan.json"
    write_plan(plan)
    d = start_daemon(config, tmp_path / "d", command=launcher(plan))
    try:
        with grpc.insecure_channel(d.address) as ch:
            stub = pb_grpc.SignerStub(ch)
            stub.SignDigest(_request(b"\x00" * 32), timeout=30)  # warm
            write_plan(plan, {"call": "sign", "latency_seconds": hold, "times": 1})
            held = stub.SignDigest.future(_request(b"\x01" * 32), timeout=30)
            time.sleep(hold / 4)  # the held call has the one thread, at the token
            try:
                stub.SignDigest(_request(b"\x02" * 32), timeout=0.3)
                late = None
            except grpc.RpcError as e:
                late = e
            assert held.result().signature
            d.wait_log("SignDigest peer=", "status=DEADLINE_EXCEEDED")
    finally:
        assert d.stop() == 0
    log = d.log()
    assert late is not None and late.code() == grpc.StatusCode.DEADLINE_EXCEEDED, late
    statuses = re.findall(r"hsmsign\.access: SignDigest peer=\S+ status=(\w+)", log)
    assert sorted(statuses) == ["DEADLINE_EXCEEDED", "OK", "OK"], statuses
    made = re.findall(r"(\d+) signatures made; calls whose caller had gone .*: (\d+) not run", log)
    assert made == [("2", "1")], made


def _request(digest: bytes) -> pb.SignDigestRequest:
    return pb.SignDigestRequest(
        key=pb.KeyRef(name="demo"),
        digest=digest,
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
    )
