"""Bundle encryption throughput and memory, measured side by side in one run.

Compares hsmsign.capgo.encrypt_bundle (AES-128-CBC + SHA-256 of the plain zip in one pass)
with ``openssl enc -aes-128-cbc`` (encryption only) and the Capgo CLI's ``bundle encrypt``
on the same random file. Each contender runs in its own process so its peak RSS
(VmHWM) is its own. Targets: hsmsign >= 0.90x openssl throughput; hsmsign's
peak RSS above an idle interpreter stays under 32 MiB whatever the size (streaming).

    .venv/bin/python bench/bench_bundle_encrypt.py --size-mb 100 --repeat 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hsmsign import capgo  # noqa: E402

RATIO_TARGET = 0.90
RSS_BUDGET_MIB = 32.0


@dataclass
class Run:
    seconds: float  # best over repeats
    rss_mib: float  # peak over repeats


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _wait(cmd: list[str], cwd: Path | None = None) -> tuple[float, float, str]:
    """Run cmd, return (wall seconds, peak RSS MiB, stdout).

    Peak RSS is the process's own VmHWM, polled while it runs (ru_maxrss from wait4 would
    include the forking parent's memory).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err)
        hwm = 0
        while proc.poll() is None:
            hwm = max(hwm, _hwm_kib(proc.pid))
            time.sleep(0.002)
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err.read()[-2000:]!r}")
        return wall, hwm / 1024, out.read().decode()


def bench_hsmsign(src: Path, dst: Path, key: bytes, iv: bytes, repeat: int) -> Run:
    best, rss = float("inf"), 0.0
    for _ in range(repeat):
        _, _, out = _wait(
            [sys.executable, "-m", "bench.bundle_child", str(src), str(dst), key.hex(), iv.hex()],
            cwd=REPO,
        )
        res = json.loads(out)
        best, rss = min(best, res["seconds"]), max(rss, res["hwm_kib"] / 1024)
    return Run(best, rss)


def idle_rss() -> float:
    _, _, out = _wait([sys.executable, "-m", "bench.bundle_child", "-", "-", "00", "00"], cwd=REPO)
    return float(json.loads(out)["hwm_kib"]) / 1024


def bench_openssl(src: Path, dst: Path, key: bytes, iv: bytes, repeat: int) -> Run | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cmd = [openssl, "enc", "-aes-128-cbc", "-K", key.hex(), "-iv", iv.hex()]
    cmd += ["-in", str(src), "-out", str(dst)]
    best, rss = float("inf"), 0.0
    for _ in range(repeat):
        wall, r, _ = _wait(cmd)
        best, rss = min(best, wall), max(rss, r)
    return Run(best, rss)


def bench_capgo_cli(src: Path, work: Path, repeat: int) -> tuple[Run, float] | None:
    """(CLI run, CLI start-up seconds) or None when node/the CLI is not available."""
    node = shutil.which("node")
    if node is None:
        return None
    from tests.harness.capgo_cli import cli_entry, make_project

    try:
        entry = cli_entry()
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        print(f"capgo CLI unavailable: {e}", file=sys.stderr)
        return None
    project = make_project(work / "capgo-project")
    _wait([node, str(entry), "key", "create"], cwd=project)
    zip_in = project / "bundle.zip"
    os.link(src, zip_in)
    checksum = hashlib.sha256(src.read_bytes()).hexdigest()
    start = min(_wait([node, str(entry), "--version"], cwd=project)[0] for _ in range(repeat))
    best, rss = float("inf"), 0.0
    for _ in range(repeat):
        wall, r, _ = _wait(
            [node, str(entry), "bundle", "encrypt", str(zip_in), checksum, "--json"], cwd=project
        )
        best, rss = min(best, wall), max(rss, r)
    return Run(best, rss), start


def make_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 1 << 22)
            f.write(os.urandom(n))
            left -= n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mb", type=float, default=100.0, help="file size in MiB (default 100)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per contender; best is kept")
    ap.add_argument("--no-cli", action="store_true", help="skip the Capgo CLI contender")
    args = ap.parse_args()
    size = int(args.size_mb * (1 << 20))

    with tempfile.TemporaryDirectory(prefix="hsmsign-bench-") as tmp:
        work = Path(tmp)
        src = work / "bundle.zip"
        make_file(src, size)
        key, iv = capgo.new_session_material()
        ours = bench_hsmsign(src, work / "ours.enc", key, iv, args.repeat)
        idle = idle_rss()
        ossl = bench_openssl(src, work / "openssl.enc", key, iv, args.repeat)
        if (
            ossl is not None
            and (work / "ours.enc").read_bytes() != (work / "openssl.enc").read_bytes()
        ):
            print("FAIL: hsmsign and openssl ciphertexts differ", file=sys.stderr)
            return 1
        cli = None if args.no_cli else bench_capgo_cli(src, work, args.repeat)

    mib = size / (1 << 20)
    print(f"file: {mib:.1f} MiB random, best of {args.repeat}")
    print(f"{'contender':<40} {'seconds':>9} {'MiB/s':>9} {'peak RSS MiB':>13} {'vs openssl':>11}")

    def row(name: str, run: Run) -> None:
        ratio = f"{ossl.seconds / run.seconds:.2f}x" if ossl else "-"
        print(
            f"{name:<40} {run.seconds:9.4f} {mib / run.seconds:9.1f} {run.rss_mib:13.1f} "
            f"{ratio:>11}"
        )

    row("hsmsign encrypt_bundle (AES+SHA-256)", ours)
    if ossl:
        row("openssl enc -aes-128-cbc (AES only)", ossl)
    if cli:
        run, start = cli
        row("capgo CLI bundle encrypt (wall)", run)
        net = run.seconds - start
        if net > 0.05:
            row(f"capgo CLI minus {start:.2f}s start-up", Run(net, run.rss_mib))
        else:
            print(f"{'capgo CLI minus start-up':<40} (within start-up noise of {start:.2f}s)")
    print(
        f"idle interpreter RSS: {idle:.1f} MiB; hsmsign encrypt adds {ours.rss_mib - idle:.1f} MiB"
    )

    ok = True
    if ossl:
        ratio = ossl.seconds / ours.seconds
        verdict = "PASS" if ratio >= RATIO_TARGET else "FAIL"
        ok &= verdict == "PASS"
        print(f"{verdict}: hsmsign/openssl throughput {ratio:.2f} (target >= {RATIO_TARGET})")
    else:
        print("SKIP: openssl not installed")
    extra = ours.rss_mib - idle
    verdict = "PASS" if extra < RSS_BUDGET_MIB else "FAIL"
    ok &= verdict == "PASS"
    print(f"{verdict}: encrypt peak RSS above idle {extra:.1f} MiB (target < {RSS_BUDGET_MIB})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
