"""``make soak``: many concurrent callers, every operation, every result verified.

Starts hsmsignd on its own SoftHSM2 token (tests.harness; loopback, port 0, ready file, the
shipped serving-process default unless ``--processes``), then ``--callers`` threads (default
64, over one connection per 8 callers) make ``--calls`` calls (default 100,000) mixed over
SignDigest, SignDigests (2-4 digests), SealBundle, SealSessionKey, SignChecksums (2-4
checksums) and UnwrapSessionKey. Every answer is checked with the public key (signatures
verify, seals open to what was sealed, an unwrap returns the key that was wrapped). The
daemon's RSS (supervisor and serving processes summed) is sampled every second; the run
passes when no call failed, every call was made within ``--max-seconds``, and RSS grew by
less than ``--max-growth-mb`` from the ``--rss-from``-th call to the end.
Writes bench/results/soak.json; exit status 0 when it passed, 1 when not.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from bench.setup import DaemonSettings, tree_rss_kib, write_bench_config
from hsmsign import unwrap_client
from hsmsign.capgo import format as capgo
from hsmsign.client import Client, seal_bundle, seal_session_key, sign_checksums
from hsmsign.errors import RemoteError
from tests.harness import hsmsignd, make_token, start_daemon

RESULTS = Path(__file__).resolve().parent / "results"

SIGN_KEY = "soak-sign"
UNWRAP_KEY = "soak-unwrap"
#: What SoftHSM2 2.6.1 can unwrap (docs/design-facts.md, fact 3).
UNWRAP_SCHEME = "rsa-oaep-sha1"
#: Callers that share one client connection (as build agents behind one host would).
CALLERS_PER_CONNECTION = 8

#: The mix: operation name and its share of calls, in percent.
MIX: tuple[tuple[str, int], ...] = (
    ("SignDigest", 35),
    ("SignDigests", 10),
    ("SealBundle", 20),
    ("SealSessionKey", 10),
    ("SignChecksums", 5),
    ("UnwrapSessionKey", 20),
)


class VerificationError(Exception):
    """An answer that came back OK but does not check out with the public key."""


@dataclass(frozen=True)
class SoakSpec:
    calls: int = 100_000
    callers: int = 64
    #: server.processes; None: the shipped default ("auto").
    processes: int | None = None
    #: RSS growth is measured from this call to the end; None: no RSS check.
    rss_from: int | None = 10_000
    max_growth_mb: float = 20.0
    max_seconds: float = 1800.0
    #: Seconds between progress lines; 0: none.
    progress_seconds: float = 10.0
    #: The operations to make, by share; default MIX (``--only`` narrows it to find which
    #: operation a growth comes from).
    mix: tuple[tuple[str, int], ...] = MIX


@dataclass
class OpStats:
    calls: int = 0
    failures: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class SoakResult:
    spec: SoakSpec
    calls: int = 0
    failures: int = 0
    seconds: float = 0.0
    #: The first few failures, one line each (status and message, or what did not verify).
    failure_samples: list[str] = field(default_factory=list)
    ops: dict[str, OpStats] = field(default_factory=dict)
    rss_start_mb: float = 0.0
    rss_at_from_mb: float | None = None
    rss_end_mb: float = 0.0
    rss_max_mb: float = 0.0
    processes: int = 0
    #: (seconds, calls done, RSS MB), one a second.
    samples: list[tuple[float, int, float]] = field(default_factory=list)

    @property
    def growth_mb(self) -> float | None:
        if self.rss_at_from_mb is None:
            return None
        return self.rss_end_mb - self.rss_at_from_mb

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def problems(self) -> list[str]:
        """Why the run did not pass (empty: it passed)."""
        out = []
        if self.failures:
            out.append(f"{self.failures} call(s) failed")
        if self.calls < self.spec.calls:
            out.append(f"only {self.calls:,} of {self.spec.calls:,} calls in {self.seconds:.0f} s")
        growth = self.growth_mb
        if self.spec.rss_from is not None:
            if growth is None:
                out.append(f"RSS not measured at call {self.spec.rss_from:,}")
            elif growth >= self.spec.max_growth_mb:
                out.append(f"RSS grew {growth:.1f} MB (bound {self.spec.max_growth_mb:g} MB)")
        return out


def _mb(kib: int) -> float:
    return round(kib / 1024, 1)


def _schedule(mix: tuple[tuple[str, int], ...], seed: int = 17) -> list[str]:
    """Operation names in the mix's proportions, shuffled: call n makes the (n % len)th."""
    names = [name for name, share in mix for _ in range(share)]
    random.Random(seed).shuffle(names)
    return names


class _Keys:
    """The public keys every answer is checked against."""

    def __init__(self, client: Client) -> None:
        sign = serialization.load_der_public_key(client.public_key(SIGN_KEY).spki_der)
        unwrap = serialization.load_der_public_key(client.public_key(UNWRAP_KEY).spki_der)
        assert isinstance(sign, rsa.RSAPublicKey) and isinstance(unwrap, rsa.RSAPublicKey)
        self.sign, self.unwrap = sign, unwrap

    def check_signature(self, signature: bytes, digest: bytes) -> None:
        try:
            self.sign.verify(signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        except Exception as e:
            raise VerificationError("a signature does not verify with the public key") from e

    def check_checksum(self, signed: str, checksum: bytes) -> None:
        try:
            found, _ = capgo.open_checksum(self.sign, signed, capgo.ChecksumFormat.V3)
        except capgo.BundleVerificationError as e:
            raise VerificationError(str(e)) from e
        if found != checksum.hex():
            raise VerificationError("a signed checksum carries another checksum")


def _one_call(op: str, client: Client, keys: _Keys, rng: random.Random) -> None:
    """Makes one call of ``op`` and checks its answer. Raises RemoteError (the call failed)
    or VerificationError (it answered something that does not check out)."""
    if op == "SignDigest":
        digest = rng.randbytes(32)
        keys.check_signature(client.sign_digest(SIGN_KEY, digest).signature, digest)
    elif op == "SignDigests":
        digests = [rng.randbytes(32) for _ in range(rng.randint(2, 4))]
        _, signatures = client.sign_digests(SIGN_KEY, digests)
        if len(signatures) != len(digests):
            raise VerificationError(f"{len(signatures)} signatures for {len(digests)} digests")
        for sig, digest in zip(signatures, digests, strict=True):
            keys.check_signature(sig, digest)
    elif op == "SealBundle":
        session_key, iv, checksum = rng.randbytes(16), rng.randbytes(16), rng.randbytes(32)
        sealed = seal_bundle(client, SIGN_KEY, session_key, iv, checksum)
        try:
            opened = capgo.open_session_key(keys.sign, sealed.iv_session_key)
        except capgo.BundleVerificationError as e:
            raise VerificationError(str(e)) from e
        if opened != (session_key, iv):
            raise VerificationError("a sealed session key opens to another key or IV")
        keys.check_checksum(sealed.signed_checksum, checksum)
    elif op == "SealSessionKey":
        session_key = rng.randbytes(16)
        sealed_key = seal_session_key(client, SIGN_KEY, session_key).signature
        try:
            opened_key = capgo.rsa_public_decrypt(keys.sign, sealed_key)
        except capgo.BundleVerificationError as e:
            raise VerificationError(str(e)) from e
        if opened_key != session_key:
            raise VerificationError("a sealed session key opens to another key")
    elif op == "SignChecksums":
        checksums = [rng.randbytes(32) for _ in range(rng.randint(2, 4))]
        _, signed = sign_checksums(client, SIGN_KEY, checksums)
        if len(signed) != len(checksums):
            raise VerificationError(f"{len(signed)} signed checksums for {len(checksums)}")
        for s, checksum in zip(signed, checksums, strict=True):
            keys.check_checksum(s, checksum)
    elif op == "UnwrapSessionKey":
        session_key = rng.randbytes(16)
        oaep = padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)  # noqa: S303
        wrapped = keys.unwrap.encrypt(session_key, oaep)
        got = unwrap_client.unwrap_session_key(client, UNWRAP_KEY, wrapped, UNWRAP_SCHEME)
        if got.session_key != session_key:
            raise VerificationError("an unwrap returned another session key")
    else:
        raise ValueError(f"unknown operation {op!r}")


def prepare(root: Path, spec: SoakSpec) -> Path:
    """A token under ``root`` with the soak's keys, and the daemon config for it."""
    token = make_token(root / "token", "hsmsign-soak")
    setup = write_bench_config(root / "setup.toml", token, DaemonSettings(processes=1))
    hsmsignd(setup, "keys", "create", SIGN_KEY)
    hsmsignd(setup, "keys", "create", UNWRAP_KEY, "--purpose", "unwrap")
    return write_bench_config(root / "soak.toml", token, DaemonSettings(processes=spec.processes))


def run_soak(spec: SoakSpec, root: Path, out: Callable[[str], None] = print) -> SoakResult:
    """Runs the soak in ``root`` (a scratch directory) and returns what it measured; never
    raises for a failed call (those are counted)."""
    config = prepare(root, spec)
    daemon = start_daemon(config, root / "daemon", timeout=120)
    result = SoakResult(spec, ops={name: OpStats() for name, _ in spec.mix})
    schedule = _schedule(spec.mix)
    lock = threading.Lock()
    next_ticket = 0
    stop = threading.Event()
    pid = daemon.proc.pid
    try:
        result.processes = len(json.loads((root / "daemon" / "ready.json").read_text())["workers"])
    except (OSError, KeyError, ValueError):
        result.processes = 1
    connections = [
        Client(daemon.address, timeout=60)
        for _ in range(max(1, -(-spec.callers // CALLERS_PER_CONNECTION)))
    ]
    try:
        keys = _Keys(connections[0])
        result.rss_start_mb = _mb(tree_rss_kib(pid))
        t0 = time.monotonic()
        deadline = t0 + spec.max_seconds

        def caller(n: int) -> None:
            nonlocal next_ticket
            client = connections[n // CALLERS_PER_CONNECTION]
            rng = random.Random(n)
            while time.monotonic() < deadline:
                with lock:
                    ticket = next_ticket
                    if ticket >= spec.calls:
                        return
                    next_ticket += 1
                op = schedule[ticket % len(schedule)]
                started = time.monotonic()
                problem: str | None = None
                try:
                    _one_call(op, client, keys, rng)
                except RemoteError as e:
                    problem = f"{op}: {e}"
                except VerificationError as e:
                    problem = f"{op}: answered OK but {e}"
                elapsed_ms = (time.monotonic() - started) * 1000
                with lock:
                    stats = result.ops[op]
                    stats.calls += 1
                    stats.latencies_ms.append(elapsed_ms)
                    result.calls += 1
                    done = result.calls
                    if problem is not None:
                        stats.failures += 1
                        result.failures += 1
                        if len(result.failure_samples) < 10:
                            result.failure_samples.append(problem)
                if done == spec.rss_from:
                    result.rss_at_from_mb = _mb(tree_rss_kib(pid))

        def sample() -> None:
            last_print, last_calls = t0, 0
            while not stop.wait(1.0):
                now = time.monotonic()
                rss = _mb(tree_rss_kib(pid))
                result.samples.append((round(now - t0, 1), result.calls, rss))
                if spec.progress_seconds and now - last_print >= spec.progress_seconds:
                    rate = (result.calls - last_calls) / (now - last_print)
                    out(
                        f"{result.calls:>9,} calls  {now - t0:6.0f} s  {rate:6.0f} calls/s "
                        f"(mean {result.calls / (now - t0):4.0f})  failures {result.failures}"
                        f"  RSS {rss:6.1f} MB"
                    )
                    last_print, last_calls = now, result.calls

        sampler = threading.Thread(target=sample, name="soak-sampler", daemon=True)
        sampler.start()
        threads = [
            threading.Thread(target=caller, args=(n,), name=f"soak-caller-{n}")
            for n in range(spec.callers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result.seconds = time.monotonic() - t0
        result.rss_end_mb = _mb(tree_rss_kib(pid))
        stop.set()
        sampler.join(5)
        result.rss_max_mb = max([s[2] for s in result.samples] + [result.rss_end_mb])
    finally:
        stop.set()
        for c in connections:
            c.close()
        daemon.stop()
    return result


def summary(result: SoakResult) -> str:
    """The per-operation table and the RSS line."""
    lines = [
        f"{'operation':<18} {'calls':>8} {'failed':>7} {'calls/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
    ]
    for name, s in result.ops.items():
        rate = s.calls / result.seconds if result.seconds else 0.0
        lines.append(
            f"{name:<18} {s.calls:>8,} {s.failures:>7} {rate:>8.0f} "
            f"{s.percentile(0.5):>7.1f} {s.percentile(0.99):>7.1f}"
        )
    lines.append(
        f"{'all':<18} {result.calls:>8,} {result.failures:>7} {result.calls_per_s:>8.0f}"
        f"   ({result.seconds:.0f} s, {result.spec.callers} callers, "
        f"{result.processes} serving process(es))"
    )
    at = "-" if result.rss_at_from_mb is None else f"{result.rss_at_from_mb}"
    growth = result.growth_mb
    lines.append(
        f"RSS (all daemon processes): start {result.rss_start_mb} MB, at call "
        f"{result.spec.rss_from or 0:,} {at} MB, end {result.rss_end_mb} MB, max "
        f"{result.rss_max_mb} MB; growth "
        + ("not checked" if growth is None else f"{growth:+.1f} MB")
        + (f" (bound < {result.spec.max_growth_mb:g} MB)" if result.spec.rss_from else "")
    )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=SoakSpec.calls)
    p.add_argument("--callers", type=int, default=SoakSpec.callers)
    p.add_argument("--processes", type=int, default=None, help="server.processes (default auto)")
    p.add_argument("--rss-from", type=int, default=SoakSpec.rss_from, help="0: no RSS check")
    p.add_argument("--max-growth-mb", type=float, default=SoakSpec.max_growth_mb)
    p.add_argument("--max-seconds", type=float, default=SoakSpec.max_seconds)
    p.add_argument(
        "--only", action="append", choices=[n for n, _ in MIX], help="only these operations"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    a = p.parse_args()
    mix = tuple((n, share) for n, share in MIX if not a.only or n in a.only)
    spec = SoakSpec(
        calls=a.calls,
        callers=a.callers,
        processes=a.processes,
        rss_from=a.rss_from or None,
        max_growth_mb=a.max_growth_mb,
        max_seconds=a.max_seconds,
        mix=mix,
    )
    print(f"soak: {spec.calls:,} calls from {spec.callers} callers, mix {dict(mix)}")
    with tempfile.TemporaryDirectory(prefix="hsmsign-soak-") as tmp:
        result = run_soak(spec, Path(tmp))
    print(summary(result))
    for line in result.failure_samples:
        print(f"  failed: {line}")
    problems = result.problems()
    record = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        **{k: v for k, v in asdict(result).items() if k not in ("ops", "samples")},
        "calls_per_s": round(result.calls_per_s, 1),
        "growth_mb": result.growth_mb,
        "ops": {
            name: {
                "calls": s.calls,
                "failures": s.failures,
                "p50_ms": round(s.percentile(0.5), 2),
                "p99_ms": round(s.percentile(0.99), 2),
            }
            for name, s in result.ops.items()
        },
        "samples": result.samples,
        "problems": problems,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=1, default=str))
    print("PASSED" if not problems else "FAILED: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
