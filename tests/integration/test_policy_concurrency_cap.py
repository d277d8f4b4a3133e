"""The per-identity concurrency cap through a real daemon (issue 14): with `concurrent = 1`,
a second call of the same identity while its first is still at the token is refused at once
with RESOURCE_EXHAUSTED and a retry hint, and served again once the first has returned.

The first call is held at the token by injected latency (tests/harness/faults.py), so the two
calls overlap for certain; loopback only, a handful of calls.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness.daemons import start_daemon
from tests.harness.faults import launcher, write_plan
from tests.harness.tokens import LOCAL_GRANTS_ALL, token_with_keys

HOLD_SECONDS = 2.0
REQUEST = pb.SignDigestRequest(
    key=pb.KeyRef(name="demo"),
    digest=hashlib.sha256(b"capped").digest(),
    algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
)


def test_a_second_call_over_the_cap_is_refused_at_once_with_a_retry_hint(tmp_path: Path) -> None:
    _token, config = token_with_keys(tmp_path / "t", ["demo"], extra="[server]\nprocesses = 1\n")
    config.write_text(config.read_text() + "\n[policy.default_limit]\nconcurrent = 1\n")
    assert "[identities.local]" in LOCAL_GRANTS_ALL  # the caller is `local`, capped at 1
    plan = tmp_path / "plan.json"
    write_plan(plan)
    d = start_daemon(config, tmp_path / "d", command=launcher(plan))
    try:
        with grpc.insecure_channel(d.address) as ch:
            stub = pb_grpc.SignerStub(ch)
            stub.SignDigest(REQUEST, timeout=30)  # warm: handles found, session open
            write_plan(plan, {"call": "sign", "latency_seconds": HOLD_SECONDS, "times": 1})
            first: list[object] = []
            held = threading.Thread(
                target=lambda: first.append(stub.SignDigest(REQUEST, timeout=30))
            )
            held.start()
            time.sleep(HOLD_SECONDS / 4)  # the first call is at the token now
            t0 = time.monotonic()
            try:
                stub.SignDigest.with_call(REQUEST, timeout=30)
                refused = None
            except grpc.RpcError as e:
                refused = e
            took = time.monotonic() - t0
            held.join(30)
            assert first, "the held call did not complete"
            again = stub.SignDigest(REQUEST, timeout=30)  # the slot is free again
    finally:
        d.stop()
    assert refused is not None, "a second call over concurrent = 1 was served"
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert took < HOLD_SECONDS / 2, f"refused after {took:.2f}s, not at once"
    trailers = [m.key for m in refused.trailing_metadata() or ()]
    assert "retry-after-ms" in trailers, trailers
    assert again.signature
