"""Load from separate client processes: each runs asyncio gRPC callers on its own channel.

Closed loop (each caller sends its next call when the last returns) measures maximum
throughput at a concurrency; paced (each caller sends on a fixed schedule, latency counted
from the scheduled time, so queueing is not hidden) measures latency at a given rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing as mp
import os
import resource
import time
from dataclasses import asdict, dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class LoadSpec:
    """One configuration of load; ``callers`` is the total over all processes."""

    target: str
    # "unary", "batch", "seal", "floor" (GetPublicKey: no token work) or "health" (gRPC only)
    call: str
    key: str
    callers: int
    processes: int = 2
    batch: int = 1
    rate: float | None = None  # calls/s over all callers; None = closed loop
    callers_per_connection: int = 4
    duration: float = 3.0
    warmup: float = 0.7


def _request(spec: LoadSpec) -> tuple[str, Any]:
    ref = pb.KeyRef(name=spec.key)
    alg = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256
    digest = hashlib.sha256(b"bench").digest()
    if spec.call == "unary":
        return "SignDigest", pb.SignDigestRequest(key=ref, algorithm=alg, digest=digest)
    if spec.call == "batch":
        return "SignDigests", pb.SignDigestsRequest(
            key=ref, algorithm=alg, digests=[digest] * spec.batch
        )
    if spec.call == "health":
        # The gRPC framework alone: the standard health check runs none of hsmsign's code.
        return "Check", health_pb2.HealthCheckRequest(service="")
    if spec.call == "floor":
        # No token work at all: what gRPC and the daemon's Python cost per call.
        return "GetPublicKey", pb.GetPublicKeyRequest(key=ref)
    if spec.call == "seal":
        return "SealBundle", pb.SealBundleRequest(
            key=ref,
            session_key=os.urandom(16),
            iv=os.urandom(16),
            checksum_sha256=digest,
            format=pb.CHECKSUM_FORMAT_V3,
        )
    raise ValueError(spec.call)


async def _worker(spec: LoadSpec, callers: int, start: float) -> dict[str, Any]:
    method, req = _request(spec)
    stop = start + spec.duration
    lat: list[float] = []
    done = [0]
    errors: dict[str, int] = {}
    async with contextlib.AsyncExitStack() as stack:
        # One connection per spec.callers_per_connection callers, as separate build agents
        # would open: the daemon's serving processes share the port and the kernel spreads
        # connections, not calls, over them.
        fns = []
        for _ in range(-(-callers // spec.callers_per_connection)):
            ch = await stack.enter_async_context(
                grpc.aio.insecure_channel(
                    spec.target, options=[("grpc.use_local_subchannel_pool", 1)]
                )
            )
            stub: Any = (
                health_pb2_grpc.HealthStub(ch) if spec.call == "health" else pb_grpc.SignerStub(ch)
            )
            fns.append(getattr(stub, method))
        interval = spec.processes * callers / spec.rate if spec.rate else 0.0

        async def caller(i: int) -> None:
            fn = fns[i % len(fns)]
            # Paced callers start staggered so the schedule is smooth.
            due = time.time() + (interval * i / callers if interval else 0.0)
            while True:
                if interval:
                    delay = due - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                t0 = due if interval else time.time()
                if t0 >= stop:
                    return
                try:
                    await fn(req, timeout=30)
                    ok = True
                except grpc.aio.AioRpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
                    ok = False
                t1 = time.time()
                if ok and start <= t1 <= stop:
                    done[0] += 1  # throughput: completions inside the window
                    if t0 >= start:
                        lat.append(t1 - t0)
                due += interval

        cpu: list[float] = []

        async def meter() -> None:
            # Client CPU inside the measured window only (not spawn, imports, warm-up).
            for at in (start, stop):
                await asyncio.sleep(max(0.0, at - time.time()))
                u = resource.getrusage(resource.RUSAGE_SELF)
                cpu.append(u.ru_utime + u.ru_stime)

        await asyncio.gather(meter(), *(caller(i) for i in range(callers)))
    return {"latencies": lat, "done": done[0], "errors": errors, "cpu_seconds": cpu[1] - cpu[0]}


def _process(spec: LoadSpec, callers: int, start: float, out: Any) -> None:
    out.put(asyncio.run(_worker(spec, callers, start)))


def run_load(spec: LoadSpec, daemon_pid: int | None = None) -> dict[str, Any]:
    """Runs the load; returns calls/s, ops/s (signatures), latency percentiles, client CPU."""
    ctx = mp.get_context("spawn")
    out: Any = ctx.Queue()
    start = time.time() + 1.5 + spec.warmup  # spawn + channel setup, then warm-up calls
    per = [spec.callers // spec.processes] * spec.processes
    for i in range(spec.callers % spec.processes):
        per[i] += 1
    procs = [ctx.Process(target=_process, args=(spec, n, start, out)) for n in per if n > 0]
    for p in procs:
        p.start()
    daemon_cpu: float | None = None
    if daemon_pid is not None:
        from bench.setup import tree_cpu_seconds

        time.sleep(max(0.0, start - time.time()))
        c0 = tree_cpu_seconds(daemon_pid)
        time.sleep(max(0.0, start + spec.duration - time.time()))
        daemon_cpu = tree_cpu_seconds(daemon_pid) - c0
    results = [out.get(timeout=spec.duration + 120) for _ in procs]
    for p in procs:
        p.join()
    lat = sorted(x for r in results for x in r["latencies"])
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    calls = sum(r["done"] for r in results)
    return {
        "spec": asdict(spec),
        "calls": calls,
        "calls_per_s": calls / spec.duration,
        "ops_per_s": calls
        * spec.batch
        * {"seal": 2, "floor": 0, "health": 0}.get(spec.call, 1)
        / spec.duration,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "errors": errors,
        "client_cpu_seconds": sum(r["cpu_seconds"] for r in results),
        "daemon_cpu_seconds": daemon_cpu,
        "latencies_ms": [round(x * 1000, 3) for x in lat[:: max(1, len(lat) // 3000)]],
    }


def _pct(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))
    return sorted_values[i] * 1000
