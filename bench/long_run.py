"""``make bench-long``: daemon RSS over a long run of unary SignDigest calls.

Sends ``--calls`` calls (default 1,000,000: about an hour at 300-500 calls/s on a shared
2-core machine, ~10 minutes at the token limit) from separate client processes in
``--chunk``-second rounds, samples the daemon's VmRSS every second, and reports growth from
the end of the warm-up round to the end of the run. Writes bench/results/long_run.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.load import LoadSpec, run_load
from bench.setup import KEY_2048, DaemonSettings, launch, make_bench_token
from bench.setup import tree_rss_kib as rss_kib

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--calls", type=int, default=1_000_000)
    p.add_argument("--callers", type=int, default=16)
    p.add_argument("--chunk", type=float, default=20.0, help="seconds per load round")
    p.add_argument("--out", type=Path, default=RESULTS / "long_run.json")
    a = p.parse_args()
    samples: list[tuple[float, int, int]] = []  # (seconds, calls so far, RSS KiB)
    with tempfile.TemporaryDirectory(prefix="hsmsign-bench-long-") as tmp:
        root = Path(tmp)
        token = make_bench_token(root)
        d = launch(root, token, DaemonSettings(), "daemon")
        pid, t0, calls = d.proc.pid, time.time(), 0
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append((time.time() - t0, calls, rss_kib(pid)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # Warm-up round: pools, channels and caches reach their working size.
            calls += run_load(LoadSpec(d.address, "unary", KEY_2048, a.callers, duration=5))[
                "calls"
            ]
            baseline = rss_kib(pid)
            errors: dict[str, int] = {}
            while calls < a.calls:
                r = run_load(LoadSpec(d.address, "unary", KEY_2048, a.callers, duration=a.chunk))
                calls += r["calls"]
                for k, v in r["errors"].items():
                    errors[k] = errors.get(k, 0) + v
                rss = rss_kib(pid)
                print(
                    f"{calls:>10,} calls  {time.time() - t0:7.0f} s  {r['calls_per_s']:5.0f}/s  "
                    f"RSS {rss / 1024:6.1f} MB (+{(rss - baseline) / 1024:.1f})",
                    flush=True,
                )
            end = rss_kib(pid)
        finally:
            stop.set()
            d.stop()
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "calls": calls,
        "seconds": round(time.time() - t0, 1),
        "rss_baseline_mb": round(baseline / 1024, 1),
        "rss_end_mb": round(end / 1024, 1),
        "rss_max_mb": round(max(s[2] for s in samples) / 1024, 1),
        "growth_mb": round((end - baseline) / 1024, 2),
        "errors": errors,
        "samples": samples,
        "note": "VmRSS summed over the supervisor and its serving processes",
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(
        f"RSS {result['rss_baseline_mb']} MB after warm-up -> {result['rss_end_mb']} MB after "
        f"{calls:,} calls (growth {result['growth_mb']} MB, max {result['rss_max_mb']} MB, "
        f"target < 20 MB) errors {errors}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
