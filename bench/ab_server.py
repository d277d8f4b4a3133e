"""A server change against a base commit, side by side on one token:
``python -m bench.ab_server [--base REV] [--rounds N] [--seconds S] [--connections C]``.

Runs two daemons with the shipped defaults, one from ``git archive REV server hsmsign`` and
one from the working tree, and loads each in turn (which goes first alternates) with h2load,
unary SignDigest over C connections. Prints each round's calls/s, the daemon's CPU per call
and its threads' voluntary context switches per call (hand-offs: a count a busy host hardly
moves, unlike the other two), then the medians and the median of the rounds' quotients
(working tree / base): one row moves 10-20% from minute to minute on a shared host, the
quotient of neighbours much less.
Needs h2load (`make deps` installs nghttp2-client); loopback only, bounded in time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.h2load import H2Spec, available, grpc_frame, run_h2load
from bench.setup import (
    KEY_2048,
    DaemonSettings,
    launch,
    make_bench_token,
    tree_context_switches,
    wait_idle,
)
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.harness.paths import REPO

METHOD = "hsmsign.v1.Signer/SignDigest"


def _export(rev: str, into: Path) -> Path:
    """``server/`` and ``hsmsign/`` as they were at ``rev``."""
    into.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "server", "hsmsign"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab_server", description=__doc__)
    p.add_argument("--base", default="HEAD", help="the commit to compare with (default HEAD)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=6, help="each row's measured window")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument(
        "--threads",
        type=int,
        help="server.threads of the working tree's daemon (default: the shipped default)",
    )
    args = p.parse_args(argv)
    if not available():
        print("h2load is not installed: run `make deps`", file=sys.stderr)
        return 2
    body = grpc_frame(
        pb.SignDigestRequest(
            key=pb.KeyRef(name=KEY_2048),
            digest=b"\x01" * 32,
            algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
        )
    )
    with tempfile.TemporaryDirectory(prefix="hsmsign-ab-") as tmp:
        root = Path(tmp)
        print(f"token and the base ({args.base}) ...", flush=True)
        token = make_bench_token(root)
        code = _export(args.base, root / "base")
        daemons = {
            "base": launch(root, token, DaemonSettings(), "base", code=code),
            "tree": launch(root, token, DaemonSettings(workers=args.threads), "tree"),
        }
        rows: dict[str, list[tuple[float, float, float]]] = {"base": [], "tree": []}
        try:
            for k in range(args.rounds):
                order = ("base", "tree") if k % 2 == 0 else ("tree", "base")
                for name in order:
                    d = daemons[name]
                    wait_idle()
                    switches = tree_context_switches(d.proc.pid)
                    r = run_h2load(
                        H2Spec(d.address, METHOD, args.connections, 1, args.seconds),
                        body,
                        d.proc.pid,
                    )
                    if r["http_failed"]:
                        print(f"  {name}: {r['http_failed']} calls failed", flush=True)
                    # Over the warm-up too: per call of the whole run (h2load's total).
                    per_call = (tree_context_switches(d.proc.pid) - switches) / max(
                        1, r["calls"] * (1 + 1 / args.seconds)
                    )
                    ms = 1000 * r["daemon_cpu_seconds"] / max(1, r["calls"])
                    rows[name].append((r["calls_per_s"], ms, per_call))
                    print(
                        f"round {k + 1} {name}: {r['calls_per_s']:7.0f} calls/s, "
                        f"{ms:.2f} ms daemon CPU and {per_call:.1f} thread sleeps per call, "
                        f"p50 {r['p50_ms']:.1f} ms, "
                        f"p99 {r['p99_ms']:.1f} ms",
                        flush=True,
                    )
        finally:
            for d in daemons.values():
                d.stop()
    quotients = [t[0] / b[0] for t, b in zip(rows["tree"], rows["base"], strict=True)]
    for name, rs in rows.items():
        print(
            f"{name}: median {statistics.median(r[0] for r in rs):.0f} calls/s, "
            f"{statistics.median(r[1] for r in rs):.2f} ms CPU and "
            f"{statistics.median(r[2] for r in rs):.1f} thread sleeps per call"
        )
    print(
        f"working tree / {args.base}: median {statistics.median(quotients):.2f} "
        f"(rounds {' / '.join(f'{q:.2f}' for q in quotients)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
