"""What the audit trail costs per call: the same daemon with ``[audit]`` off and on, side by
side, unary SignDigest and batch SignDigests, rounds interleaved (off, on, off, on, ...), and
the group commit measured in-process (records per fsync, microseconds per record).

    .venv/bin/python -m bench.bench_audit [--seconds 3] [--rounds 2] [--callers 16]

A benchmark, not a test: figures move with the machine's load, ratios from one run are what
docs/adr/0006-audit-trail.md quotes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

from bench.setup import KEY_2048, DaemonSettings, make_bench_token, write_bench_config
from hsmsign import auditlog
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server.audit.config import AuditConfig
from server.audit.writer import ChainWriter
from tests.harness import Daemon, TokenDir, start_daemon

ALGORITHM = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256


def _daemon(root: Path, token: TokenDir, name: str, audit: bool) -> Daemon:
    config = write_bench_config(root / f"{name}.toml", token, DaemonSettings())
    if audit:
        with config.open("a") as f:
            f.write(f'\n[audit]\npath = "{root / name / "audit"}"\n')
    return start_daemon(config, root / name)


def _rate(address: str, callers: int, seconds: float, batch: int) -> float:
    """Signatures per second from ``callers`` threads, each on its own channel."""
    done = [0] * callers
    failed = [0] * callers
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        stub = pb_grpc.SignerStub(grpc.insecure_channel(address))
        digests = [bytes([i % 256]) * 32] * batch
        while time.monotonic() < stop:
            try:
                if batch == 1:
                    stub.SignDigest(
                        pb.SignDigestRequest(
                            key=pb.KeyRef(name=KEY_2048), algorithm=ALGORITHM, digest=digests[0]
                        ),
                        timeout=30,
                    )
                else:
                    stub.SignDigests(
                        pb.SignDigestsRequest(
                            key=pb.KeyRef(name=KEY_2048), algorithm=ALGORITHM, digests=digests
                        ),
                        timeout=60,
                    )
                done[i] += batch
            except grpc.RpcError:
                failed[i] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if sum(failed):
        raise SystemExit(f"{sum(failed)} calls failed against {address}")
    return sum(done) / (time.monotonic() - t0)


def _group_commit(directory: Path, threads: int, records: int) -> tuple[float, float]:
    """(microseconds per record, records per fsync) of the chain writer alone."""
    writer = ChainWriter(AuditConfig(directory=directory), "bench", "bench", None, lambda ok: None)
    writer.start()
    fsyncs_before = writer.fsyncs
    record = {"kind": "call", "op": "SignDigest", "inputs": {"digest": "sha256:" + "0" * 64}}

    def run() -> None:
        for _ in range(records // threads):
            writer.append({**record, "time": auditlog.utc_now()})

    t0 = time.perf_counter()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - t0
    fsyncs = writer.fsyncs - fsyncs_before
    writer.stop()
    return elapsed / records * 1e6, records / max(1, fsyncs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per row (default 3)")
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs per row (default 2)")
    p.add_argument("--callers", type=int, default=16, help="unary callers (default 16)")
    p.add_argument("--batch", type=int, default=256, help="digests per SignDigests call")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hsmsign-bench-audit-") as tmp:
        root = Path(tmp)
        token = make_bench_token(root)
        print("group commit (chain writer in-process, fsync per commit):")
        for threads in (1, 8):
            us, per = _group_commit(root / f"gc{threads}", threads, 2000)
            print(f"  {threads} thread(s): {us:7.1f} us per record, {per:5.1f} records per fsync")
        off = _daemon(root, token, "off", audit=False)
        on = _daemon(root, token, "on", audit=True)
        try:
            rows = [
                ("unary SignDigest", args.callers, 1),
                (f"SignDigests x{args.batch}", 2, args.batch),
            ]
            for name, callers, batch in rows:
                rates: dict[str, list[float]] = {"off": [], "on": []}
                for r in range(args.rounds):
                    order = [("off", off), ("on", on)] if r % 2 == 0 else [("on", on), ("off", off)]
                    for label, d in order:
                        rates[label].append(_rate(d.address, callers, args.seconds, batch))
                m_off, m_on = statistics.median(rates["off"]), statistics.median(rates["on"])
                print(
                    f"{name:22s} audit off {m_off:8.0f} sig/s   audit on {m_on:8.0f} sig/s   "
                    f"on/off {m_on / m_off:5.2f}   ({callers} callers, {args.rounds} rounds)"
                )
        finally:
            off.stop()
            on.stop()
        records = sum(1 for r in auditlog.read([root / "on" / "audit"]) if r.get("kind") == "call")
        print(f"audit records written by the 'on' daemon: {records}")


if __name__ == "__main__":
    main()
