"""The two in-process limits, each run in its own process: ``python -m bench.inprocess``.

``physical``: PKCS#1 v1.5 signatures with cryptography (OpenSSL), one thread per core.
``token``: python-pkcs11 on the bench's SoftHSM2 token through p11-kit's proxy (as the daemon
loads it), one session per thread. Prints one JSON object: ops/s, per-op latencies, CPU.
``token-slices``: the same token limit kept up (logged in, sessions open), signing only in
the slices it is told to run: one ``run SECONDS`` line on stdin, one JSON line on stdout
(bench.slices alternates it with the daemon's load).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.slices import answer_slices

PREFIX_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")


def _run_threads(
    ops: Sequence[Callable[[], None]], duration: float, warmup: float = 0.3
) -> dict[str, Any]:
    """Runs each op in a loop on its own thread; counts completions inside the window."""
    start = time.perf_counter() + warmup
    stop = start + duration
    lat: list[list[float]] = [[] for _ in ops]

    def loop(i: int) -> None:
        op, out = ops[i], lat[i]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            op()
            if t0 >= start:
                out.append(time.perf_counter() - t0)

    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(ops))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    all_lat = sorted(x for xs in lat for x in xs)
    return {
        "ops": len(all_lat),
        "seconds": duration,
        "ops_per_s": len(all_lat) / duration,
        "latencies_ms": [round(x * 1000, 4) for x in all_lat[:: max(1, len(all_lat) // 5000)]],
        "cpu_seconds": cpu,
        "cores": cpu / (duration + warmup),
        "threads": len(ops),
    }


def physical(bits: int, threads: int, duration: float) -> dict[str, Any]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    key = rsa.generate_private_key(65537, bits)
    digest = hashlib.sha256(b"bench").digest()
    pad, alg = padding.PKCS1v15(), Prehashed(hashes.SHA256())

    def op() -> None:
        key.sign(digest, pad, alg)

    return _run_threads([op] * threads, duration)


def token(conf: str, label: str, pin_file: str, key: str, threads: int, duration: float) -> Any:
    login, sessions, ops = _token_ops(conf, label, pin_file, key, threads)
    try:
        return _run_threads(ops, duration)
    finally:
        for s in sessions:
            s.close()
        login.close()


def _token_ops(
    conf: str, label: str, pin_file: str, key: str, threads: int
) -> tuple[Any, list[Any], list[Callable[[], None]]]:
    """Logs in to the token and opens one session per thread; returns the login session, the
    sessions and one signing op per session (a PKCS#1 v1.5 block, as the daemon signs)."""
    os.environ["SOFTHSM2_CONF"] = conf
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    from tests.harness.paths import PROXY_MODULE

    tok = pkcs11.lib(PROXY_MODULE).get_token(token_label=label)
    login = tok.open(user_pin=Path(pin_file).read_text(), rw=True)
    block = PREFIX_SHA256 + hashlib.sha256(b"bench").digest()
    sessions = [tok.open(rw=True) for _ in range(threads)]
    ops: list[Callable[[], None]] = []
    for s in sessions:
        (k,) = [
            o
            for o in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            if (o[Attribute.LABEL] or "").endswith(f":{key}:v1")
        ]

        def op(k: Any = k) -> None:
            k.sign(block, mechanism=Mechanism.RSA_PKCS)

        ops.append(functools.partial(op, k))
    return login, sessions, ops


def sign_slice(ops: Sequence[Callable[[], None]], seconds: float) -> dict[str, Any]:
    """One slice of the kept-up token probe: every op signs in a loop on its own thread from
    now for ``seconds``; an op that straddles the window's end counts by its overlap
    (bench.slices.counted), as the daemon's batch calls do."""
    from bench.slices import Span, counted

    spans: list[list[Span]] = [[] for _ in ops]
    cpu0 = time.process_time()
    start = time.perf_counter()
    stop = start + seconds

    def loop(i: int) -> None:
        op, out = ops[i], spans[i]
        while (t0 := time.perf_counter()) < stop:
            op()
            out.append(Span(t0, time.perf_counter(), 1))

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(len(ops))]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wall = time.perf_counter() - start
    done = counted([s for xs in spans for s in xs], start, stop)
    lat = sorted(s.end - s.start for xs in spans for s in xs)
    return {
        "ops": done,
        "seconds": seconds,
        "ops_per_s": done / seconds,
        "signed": sum(len(xs) for xs in spans),
        "wall_seconds": wall,
        "cpu_seconds": time.process_time() - cpu0,
        "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
        "threads": len(ops),
    }


def token_slices(conf: str, label: str, pin_file: str, key: str, threads: int) -> None:
    """The token probe kept up: logged in once, sessions open, and signing only while a slice
    runs. Reads ``run SECONDS`` lines from stdin and answers each with one JSON line; stops at
    ``quit`` or when stdin closes (the bench went away), so it never outlives its caller."""
    login, sessions, ops = _token_ops(conf, label, pin_file, key, threads)
    try:
        sign_slice(ops, 0.3)  # warm-up: first signatures, thread start-up
        print(json.dumps({"ready": True, "threads": threads}), flush=True)
        answer_slices(sys.stdin, lambda seconds: sign_slice(ops, seconds))
    finally:
        for s in sessions:
            s.close()
        login.close()


def token_paced(
    conf: str, label: str, pin_file: str, key: str, threads: int, rate: float, duration: float
) -> dict[str, Any]:
    """The token alone under open-loop load: signatures requested on an even schedule at
    ``rate``/s, served by ``threads`` threads (one session each), latency counted from each
    request's scheduled time. What queueing alone costs at that rate, with no gRPC."""
    os.environ["SOFTHSM2_CONF"] = conf
    import queue

    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    from tests.harness.paths import PROXY_MODULE

    tok = pkcs11.lib(PROXY_MODULE).get_token(token_label=label)
    login = tok.open(user_pin=Path(pin_file).read_text(), rw=True)
    block = PREFIX_SHA256 + hashlib.sha256(b"bench").digest()
    sessions = [tok.open(rw=True) for _ in range(threads)]
    due: queue.SimpleQueue[float | None] = queue.SimpleQueue()
    lat: list[float] = []
    warmup = 0.5
    start = time.perf_counter() + 0.2
    measure_from = start + warmup

    def serve(s: Any) -> None:
        (k,) = [
            o
            for o in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            if (o[Attribute.LABEL] or "").endswith(f":{key}:v1")
        ]
        while (t := due.get()) is not None:
            k.sign(block, mechanism=Mechanism.RSA_PKCS)
            if t >= measure_from:
                lat.append(time.perf_counter() - t)

    workers = [threading.Thread(target=serve, args=(s,)) for s in sessions]
    for w in workers:
        w.start()
    n = int((warmup + duration) * rate)
    for i in range(n):
        t = start + i / rate
        delay = t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        due.put(t)
    for _ in workers:
        due.put(None)
    for w in workers:
        w.join()
    for s in sessions:
        s.close()
    login.close()
    lat.sort()
    return {
        "ops": len(lat),
        "rate": rate,
        "threads": threads,
        "latencies_ms": [round(x * 1000, 4) for x in lat[:: max(1, len(lat) // 5000)]],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["physical", "token", "token-paced", "token-slices"])
    p.add_argument("--rate", type=float, default=100.0, help="token-paced: signatures/s")
    p.add_argument("--bits", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--conf", default="")
    p.add_argument("--label", default="")
    p.add_argument("--pin-file", default="")
    p.add_argument("--key", default="")
    a = p.parse_args()
    if a.what == "token-slices":
        token_slices(a.conf, a.label, a.pin_file, a.key, a.threads)
        return 0
    if a.what == "physical":
        out = physical(a.bits, a.threads, a.duration)
    elif a.what == "token-paced":
        out = token_paced(a.conf, a.label, a.pin_file, a.key, a.threads, a.rate, a.duration)
    else:
        out = token(a.conf, a.label, a.pin_file, a.key, a.threads, a.duration)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
