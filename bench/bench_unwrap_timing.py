"""Timing of PKCS#1 v1.5 unwrap: valid versus invalid ciphertexts (a benchmark, not a test).

Implicit rejection makes the answer the same for valid and invalid paddings; what is left is
timing. This measures the in-process operation (server.unwrap.unwrap_session_key, token calls
included, no gRPC: the network only adds noise that hides a difference) on a fresh SoftHSM2
token, with valid, bit-flipped and random ciphertexts interleaved in random order, for both
token paths: raw RSA (CKM_RSA_X_509, padding checked in the daemon) and the CKM_RSA_PKCS
fallback (for tokens that refuse raw RSA). It prints the medians, percentiles and the
difference of medians with a bootstrap 95% interval.

    .venv/bin/python -m bench.bench_unwrap_timing [--n 2000]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import padding, rsa

from server import config as config_mod
from server.keyring.model import KeyReference, Purpose
from server.keyring.ring import KeyRing
from server.ops import unwrap
from server.pkcs11.token import Token
from tests.harness import hsmsignd, make_token, write_config


def _flip(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    i = rng.randrange(8, len(b) * 8)  # keep the top byte so the value stays below n
    b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def _bootstrap_median_diff(
    a: list[float], b: list[float], rng: random.Random, rounds: int = 1000
) -> tuple[float, float]:
    diffs = sorted(
        statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
        for _ in range(rounds)
    )
    return diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds)]


def run(n: int, raw: bool, token: Token, ring: KeyRing, cfg: config_mod.Config) -> None:
    rng = random.Random(1)
    key = ring.resolve(KeyReference(name="legacy"), Purpose.UNWRAP)
    pub: rsa.RSAPublicKey = key.public_key
    modulus = pub.public_numbers().n
    scheme = unwrap.SCHEMES["rsa-pkcs1v15"]
    options = cfg.key_options("legacy")
    if raw:
        unwrap._RAW_RSA_REFUSED.discard(id(token))
    else:
        unwrap._RAW_RSA_REFUSED.add(id(token))
    valid = [pub.encrypt(os.urandom(16), padding.PKCS1v15()) for _ in range(n)]
    flipped = [_flip(c, rng) for c in valid]
    randoms = [(rng.getrandbits(2048) % modulus).to_bytes(256, "big") for _ in range(n)]
    work = [("valid", c) for c in valid] + [("flipped", c) for c in flipped]
    work += [("random", c) for c in randoms]
    rng.shuffle(work)
    for _kind, c in work[:200]:  # warm up sessions, handles, caches
        unwrap.unwrap_session_key(token, key, scheme, c, options)
    times: dict[str, list[float]] = {"valid": [], "flipped": [], "random": []}
    for kind, c in work:
        t0 = time.perf_counter_ns()
        unwrap.unwrap_session_key(token, key, scheme, c, options)
        times[kind].append((time.perf_counter_ns() - t0) / 1000)
    path = "raw RSA (CKM_RSA_X_509) + padding check in the daemon" if raw else "CKM_RSA_PKCS"
    print(f"\n{path}: {n} ciphertexts of each kind, microseconds per call")
    print(f"{'kind':<8} {'median':>8} {'mean':>8} {'p10':>8} {'p90':>8}")
    for kind, xs in times.items():
        print(
            f"{kind:<8} {statistics.median(xs):8.1f} {statistics.fmean(xs):8.1f} "
            f"{_percentile(xs, 0.1):8.1f} {_percentile(xs, 0.9):8.1f}"
        )
    for kind in ("flipped", "random"):
        lo, hi = _bootstrap_median_diff(times[kind], times["valid"], rng)
        d = statistics.median(times[kind]) - statistics.median(times["valid"])
        print(
            f"median({kind}) - median(valid) = {d:+.1f} us "
            f"(bootstrap 95% interval {lo:+.1f} .. {hi:+.1f} us)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000, help="ciphertexts of each kind")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hsmsign-bench-unwrap-") as tmp:
        t = make_token(Path(tmp) / "token", "hsmsign-bench-unwrap")
        path = write_config(
            Path(tmp) / "bench.toml",
            t,
            extra="[keys.legacy]\nallow_pkcs1v15_unwrap = true\n",
        )
        path.write_text(path.read_text().replace('log_level = "INFO"', 'log_level = "WARNING"'))
        hsmsignd(path, "keys", "create", "legacy", "--purpose", "unwrap")
        cfg = config_mod.load(path)
        token = Token(cfg.token)
        try:
            ring = KeyRing(token, cfg)
            print(f"SoftHSM2 via p11-kit proxy, RSA-2048, {os.cpu_count()} CPUs")
            run(args.n, True, token, ring, cfg)
            run(args.n, False, token, ring, cfg)
        finally:
            token.close()


if __name__ == "__main__":
    main()
