"""Calls racing a serving process's stop are answered, not cancelled (issue 16).

gRPC answers CANCELLED to a call it holds but has not handed to a handler when its shutdown
begins (grpc/grpc#41785). Callers that retry at once on UNAVAILABLE (what a draining daemon
answers) always have such a call on the way, so before this fix each stop, by SIGTERM or by a
refused PIN, answered CANCELLED to some of them ("the operation was cancelled, typically by
the caller": no client retries it). Measured here: 3 to 7 of 8 such callers per stop.

Real daemons, real channels with no service config (no client retries), loopback only;
bounded: a few stops, each callers' loop ends when the daemon has exited.
"""

from __future__ import annotations

import collections
import hashlib
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness.daemons import Daemon, start_daemon
from tests.harness.tokens import token_with_keys

STOPS = 3
CALLERS = 8
DIGEST = hashlib.sha256(b"racing the stop").digest()


def _caller(
    address: str, health: bool, done: threading.Event, seen: collections.Counter[str]
) -> None:
    """Calls in a loop on its own connection, at once again after every answer."""
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        signer, checker = pb_grpc.SignerStub(ch), health_pb2_grpc.HealthStub(ch)
        request = pb.SignDigestRequest(
            key=pb.KeyRef(name="demo"),
            digest=DIGEST,
            algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
        )
        while not done.is_set():
            try:
                if health:
                    checker.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                else:
                    signer.SignDigest(request, timeout=10)
                seen["OK"] += 1
            except grpc.RpcError as e:
                seen[f"{e.code().name}: {e.details()}"] += 1


def _stop_under_calls(d: Daemon) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    done = threading.Event()
    threads = [
        threading.Thread(target=_caller, args=(d.address, n % 4 == 3, done, seen))
        for n in range(CALLERS)
    ]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while seen["OK"] < 20 * CALLERS and time.monotonic() < deadline:  # all under way
            time.sleep(0.05)
        code = d.stop()
    finally:
        done.set()
        for t in threads:
            t.join(30)
    assert code == 0, d.log()[-2000:]
    return seen


def test_calls_racing_a_stop_are_answered_unavailable_not_cancelled(tmp_path: Path) -> None:
    _token, config = token_with_keys(
        tmp_path / "t", ["demo"], extra="[server]\nprocesses = 1\ngrace_seconds = 5\n"
    )
    cancelled: list[str] = []
    for n in range(STOPS):
        seen = _stop_under_calls(start_daemon(config, tmp_path / f"d{n}"))
        assert seen["OK"] >= 20 * CALLERS, seen
        cancelled += [f"stop {n + 1}: {k} x{v}" for k, v in seen.items() if k.startswith("CANCEL")]
        other = {k: v for k, v in seen.items() if not k.startswith(("OK", "UNAVAILABLE", "CANCEL"))}
        assert not other, f"stop {n + 1}: answers other than OK and UNAVAILABLE: {other}"
    assert not cancelled, "calls racing the stop were cancelled:\n" + "\n".join(cancelled)
