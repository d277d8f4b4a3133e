"""The two in-process limits, each run in its own process: ``python -m bench.inprocess``.

``physical``: PKCS#1 v1.5 signatures with cryptography (OpenSSL), one thread per core.
``token``: python-pkcs11 on the bench's SoftHSM2 token through p11-kit's proxy (as the daemon
loads it), one session per thread. Prints one JSON object: ops/s, per-op latencies, CPU.
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
    os.environ["SOFTHSM2_CONF"] = conf
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    from tests.harness.paths import PROXY_MODULE

    lib = pkcs11.lib(PROXY_MODULE)
    tok = lib.get_token(token_label=label)
    login = tok.open(user_pin=Path(pin_file).read_text(), rw=True)
    block = PREFIX_SHA256 + hashlib.sha256(b"bench").digest()
    ops = []
    sessions = [tok.open(rw=True) for _ in range(threads)]
    for s in sessions:
        (k,) = [
            o
            for o in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            if (o[Attribute.LABEL] or "").endswith(f":{key}:v1")
        ]

        def op(k: Any = k) -> None:
            k.sign(block, mechanism=Mechanism.RSA_PKCS)

        ops.append(functools.partial(op, k))
    try:
        return _run_threads(ops, duration)
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
    p.add_argument("what", choices=["physical", "token", "token-paced"])
    p.add_argument("--rate", type=float, default=100.0, help="token-paced: signatures/s")
    p.add_argument("--bits", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--conf", default="")
    p.add_argument("--label", default="")
    p.add_argument("--pin-file", default="")
    p.add_argument("--key", default="")
    a = p.parse_args()
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
