"""Memory under abuse (issue 17): many connections sending large messages keep a serving
process under a documented bound (docs/operations.md, "Memory"), a legitimate caller is
served meanwhile, and the byte budget refuses large requests that do not fit with
RESOURCE_EXHAUSTED at once."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from pathlib import Path

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness import Daemon, TokenDir, start_daemon, write_config
from tests.harness.calls import sign_status

#: The bound docs/operations.md documents for one serving process under this abuse.
RSS_BOUND_KIB = 384 * 1024
MIB = 1024 * 1024


def _daemon(token: TokenDir, tmp: Path, limits: str = "") -> Daemon:
    config = write_config(
        tmp / "hsmsignd.toml",
        token,
        extra=f"[server]\nprocesses = 1\n[server.limits]\n{limits}",
    )
    return start_daemon(config, tmp / "run")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _batch(size: int) -> pb.SignDigestsRequest:
    return pb.SignDigestsRequest(
        key=pb.KeyRef(name="demo"),
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
        digests=[b"\1" * 32] * (size // 34),
    )


def _flood(address: str, request: pb.SignDigestsRequest, connections: int) -> Counter[str]:
    """``connections`` separate connections, each sending ``request`` once, all at once."""
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    options = [("grpc.max_send_message_length", 64 * MIB), ("grpc.use_local_subchannel_pool", 1)]

    def one() -> None:
        with grpc.insecure_channel(address, options=options) as channel:
            try:
                pb_grpc.SignerStub(channel).SignDigests(request, timeout=60)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
        with lock:
            codes[code] += 1

    threads = [threading.Thread(target=one) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return codes


def test_large_messages_from_many_connections_stay_under_the_rss_bound(
    token: TokenDir, tmp_path: Path
) -> None:
    d = _daemon(token, tmp_path)
    try:
        served: list[tuple[grpc.StatusCode, str]] = []

        def legitimate() -> None:
            with grpc.insecure_channel(d.address) as channel:
                served.append(sign_status(channel, timeout=30))

        caller = threading.Thread(target=legitimate)
        caller.start()
        # 64 connections sending 4 MiB (over the transport's 1 MiB bound), then 64 sending
        # just under the bound (read, then refused: too many digests for one batch).
        over = _flood(d.address, _batch(4 * MIB), 64)
        under = _flood(d.address, _batch(MIB - 1024), 64)
        caller.join(60)
        assert over == {"RESOURCE_EXHAUSTED": 64}
        assert sum(under.values()) == 64 and "OK" not in under
        assert served == [(grpc.StatusCode.OK, "")]
        with grpc.insecure_channel(d.address) as channel:
            assert sign_status(channel, timeout=30) == (grpc.StatusCode.OK, "")
        peak = _status_kib(d.proc.pid, "VmHWM")
        assert peak < RSS_BOUND_KIB, f"peak RSS {peak} KiB; bound {RSS_BOUND_KIB} KiB"
    finally:
        assert d.stop() == 0


def test_large_requests_over_the_byte_budget_are_refused_at_once(
    token: TokenDir, tmp_path: Path
) -> None:
    # Room for one full batch at a time.
    d = _daemon(token, tmp_path, f"max_bytes_in_flight = {MIB}")
    sha512 = [hashlib.sha512(i.to_bytes(4, "big")).digest() for i in range(10_000)]
    full = pb.SignDigestsRequest(
        key=pb.KeyRef(name="demo"),
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512,
        digests=sha512,
    )
    assert full.ByteSize() > MIB // 2
    try:
        results: list[tuple[str, str]] = []
        lock = threading.Lock()

        def batch() -> None:
            with grpc.insecure_channel(d.address) as channel:
                try:
                    # Deadline short: the batch is stopped part-way, its budget given back.
                    pb_grpc.SignerStub(channel).SignDigests(full, timeout=3)
                    result = ("OK", "")
                except grpc.RpcError as e:
                    result = (e.code().name, e.details() or "")
            with lock:
                results.append(result)

        threads = [threading.Thread(target=batch) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        busy = [details for code, details in results if code == "RESOURCE_EXHAUSTED"]
        assert busy, results
        assert all("budget" in details for details in busy), busy
        # Once the batches are over, the budget is whole again.
        small = pb.SignDigestsRequest(
            key=pb.KeyRef(name="demo"),
            algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512,
            digests=sha512[:1500],
        )
        assert small.ByteSize() > 64 * 1024
        with grpc.insecure_channel(d.address) as channel:
            r = pb_grpc.SignerStub(channel).SignDigests(small, timeout=60)
            assert len(r.signatures) == 1500
    finally:
        assert d.stop() == 0
    assert "status=RESOURCE_EXHAUSTED" in d.log()
