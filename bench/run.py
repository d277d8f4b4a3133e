"""``make bench``: every configuration measured side by side in one run on this machine.

Prints a table with PASS/FAIL per target, and writes bench/results/results.json and
bench/results/results.png. See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.load import LoadSpec, run_load
from bench.setup import KEY_2048, KEY_3072, DaemonSettings, launch, make_bench_token
from tests.conftest import TokenDir

RESULTS = Path(__file__).resolve().parent / "results"


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def _inprocess(args: list[str]) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "bench.inprocess", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    out: dict[str, Any] = json.loads(r.stdout)
    lat = out.pop("latencies_ms")
    out["p50_ms"], out["p99_ms"] = _pct(lat, 50), _pct(lat, 99)
    return out


def physical_limit(bits: int, duration: float) -> dict[str, Any]:
    threads = os.cpu_count() or 1
    r = _inprocess(
        ["physical", "--bits", str(bits), "--threads", str(threads), "--duration", str(duration)]
    )
    return {
        "name": f"physical: OpenSSL RSA-{bits}, {threads} threads",
        "group": "physical",
        "bits": bits,
        **r,
    }


def token_limit(token: TokenDir, bits: int, threads: list[int], duration: float) -> dict[str, Any]:
    key = KEY_2048 if bits == 2048 else KEY_3072
    runs = []
    for n in threads:
        r = _inprocess(
            [
                "token",
                "--conf",
                str(token.conf),
                "--label",
                token.label,
                "--pin-file",
                str(token.pin_file),
                "--key",
                key,
                "--threads",
                str(n),
                "--duration",
                str(duration),
            ]
        )
        runs.append(r)
        print(f"  token RSA-{bits} {n} threads: {r['ops_per_s']:.0f}/s", flush=True)
    best = max(runs, key=lambda r: r["ops_per_s"])
    return {
        "name": f"token: python-pkcs11 RSA-{bits}, best of {threads} threads ({best['threads']})",
        "group": "token",
        "bits": bits,
        **best,
        "sweep": {str(r["threads"]): r["ops_per_s"] for r in runs},
    }


def daemon_row(name: str, spec: LoadSpec, pid: int) -> dict[str, Any]:
    r = run_load(spec, pid)
    r.pop("latencies_ms")
    r["cores"] = r["daemon_cpu_seconds"] / spec.duration
    r["name"], r["group"] = name, "daemon"
    if r["errors"]:
        # A row whose calls failed measures nothing: say so instead of printing its rate.
        r["not_available"] = f"{spec.call}: calls failed {r['errors']}"
    print(
        f"  {name}: {r['ops_per_s']:.0f} sig/s p50 {r['p50_ms'] or 0:.2f} ms "
        f"p99 {r['p99_ms'] or 0:.2f} ms errors {r['errors']}",
        flush=True,
    )
    return r


def daemon_rows(
    root: Path, token: TokenDir, s: DaemonSettings, duration: float, tag: str = ""
) -> list[dict[str, Any]]:
    d = launch(root, token, s, f"daemon-{s.sessions}-{s.workers}-{s.log_level}")
    rows: list[dict[str, Any]] = []
    try:
        pid, addr = d.proc.pid, d.address

        def spec(call: str, callers: int, **kw: Any) -> LoadSpec:
            return LoadSpec(addr, call, kw.pop("key", KEY_2048), callers, duration=duration, **kw)

        for c in (1, 16, 64):
            rows.append(daemon_row(f"{tag}unary SignDigest, {c} callers", spec("unary", c), pid))
        max_unary = max(r["calls_per_s"] for r in rows)
        rows.append(
            daemon_row(f"{tag}batch SignDigests x64, 4 callers", spec("batch", 4, batch=64), pid)
        )
        rows.append(
            daemon_row(
                f"{tag}batch SignDigests x64, 4 callers, RSA-3072",
                spec("batch", 4, batch=64, key=KEY_3072),
                pid,
            )
        )
        rows.append(
            daemon_row(f"{tag}Capgo SealBundle (2 signatures), 64 callers", spec("seal", 64), pid)
        )
        for call, what in (
            ("health", "gRPC alone: health Check (no hsmsign code)"),
            ("floor", "gRPC floor: GetPublicKey (no token work)"),
        ):
            r = daemon_row(f"{tag}{what}, 64 callers", spec(call, 64), pid)
            r["floor"] = True
            rows.append(r)
        half = max_unary / 2
        r = daemon_row(
            f"{tag}unary paced at half max ({half:.0f} calls/s), 16 callers",
            spec("unary", 16, rate=half),
            pid,
        )
        r["paced"] = True
        rows.append(r)
    finally:
        d.stop()
    for r in rows:
        r["daemon"] = s.describe()
    return rows


def bundle_rows(quick: bool) -> list[dict[str, Any]]:
    """Part 4, with bench/bench_bundle_encrypt.py's contenders: the same random file through
    hsmsign's encrypt_bundle, openssl enc and the Capgo CLI."""
    from bench import bench_bundle_encrypt as bbe

    rows: list[dict[str, Any]] = []
    repeat = 1 if quick else 3
    for size_mb in (1, 100):
        with tempfile.TemporaryDirectory(prefix="hsmsign-bench-bundle-") as tmp:
            work = Path(tmp)
            src = work / "bundle.zip"
            bbe.make_file(src, size_mb << 20)
            key, iv = bbe.capgo.new_session_material()
            runs: dict[str, Any] = {
                "hsmsign": bbe.bench_hsmsign(src, work / "ours.enc", key, iv, repeat),
                "openssl": bbe.bench_openssl(src, work / "openssl.enc", key, iv, repeat),
            }
            cli = bbe.bench_capgo_cli(src, work, repeat)
            runs["capgo"] = cli[0] if cli else None
            names = {
                "hsmsign": "hsmsign bundle encrypt (AES-128-CBC + SHA-256)",
                "openssl": "openssl enc -aes-128-cbc",
                "capgo": "Capgo CLI bundle encrypt",
            }
            for tool, run in runs.items():
                name = f"{names[tool]}, {size_mb} MB"
                if run is None:
                    rows.append(
                        {
                            "name": name,
                            "group": "bundle",
                            "tool": tool,
                            "not_available": f"{tool} not installed or not runnable",
                        }
                    )
                    continue
                row = {
                    "name": name,
                    "group": "bundle",
                    "tool": tool,
                    "size_mb": size_mb,
                    "seconds": run.seconds,
                    "mb_per_s": size_mb / run.seconds,
                    "peak_rss_mb": run.rss_mib,
                }
                if tool == "capgo" and cli:
                    row["startup_seconds"] = cli[1]
                rows.append(row)
                print(f"  {name}: {row['mb_per_s']:.0f} MB/s ({run.seconds:.3f} s)", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="short runs (about a minute)")
    p.add_argument("--duration", type=float, default=None, help="seconds per configuration")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also run the daemon rows with sessions=2 and 8, workers=8 and 64",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    duration = a.duration or (1.5 if a.quick else 4.0)
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="hsmsign-bench-") as tmp:
        root = Path(tmp)
        print("making the bench token and keys...", flush=True)
        token = make_bench_token(root)
        print("1. physical limit (OpenSSL in-process)", flush=True)
        for bits in (2048, 3072):
            rows.append(physical_limit(bits, duration))
        print("2. token limit (python-pkcs11 in-process, through p11-kit-proxy)", flush=True)
        rows.append(token_limit(token, 2048, [1, 2] if a.quick else [1, 2, 4], duration))
        rows.append(token_limit(token, 3072, [2] if a.quick else [1, 2], duration))
        print("3. the daemon (load from 2 client processes)", flush=True)
        rows += daemon_rows(root, token, DaemonSettings(), duration)
        # Again after the daemon rows: the machine is shared, so the reference drifts; the
        # targets use the mean of both token measurements.
        best = str(rows[2]["threads"])
        again = token_limit(token, 2048, [int(best)], duration)
        again["name"] = f"token: python-pkcs11 RSA-2048, {best} threads, again after the daemon"
        rows.append(again)
        if a.sweep:
            for s in (
                DaemonSettings(sessions=2),
                DaemonSettings(sessions=8),
                DaemonSettings(workers=8),
                DaemonSettings(workers=64),
            ):
                rows += daemon_rows(root, token, s, duration, tag=f"[{s.describe()}] ")
        print("4. bundle encryption", flush=True)
        rows += bundle_rows(a.quick)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_end": os.getloadavg(),
            "note": "other load moves absolute numbers; compare rows of one run",
        },
        "duration_per_config_s": duration,
        "wall_seconds": round(time.time() - t0, 1),
        "rows": rows,
    }
    result["targets"] = report.targets(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print()
    print(report.table(result))
    try:
        report.chart(result, a.out / "results.png")
        print(f"\nwrote {a.out / 'results.json'} and {a.out / 'results.png'}")
    except ImportError:
        print(f"\nwrote {a.out / 'results.json'} (matplotlib missing: no chart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
