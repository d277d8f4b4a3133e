"""``make bench``: every configuration measured side by side in one run on this machine.

Prints a table with PASS/FAIL per target, and writes bench/results/results.json and
bench/results/results.png. See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bench import report
from bench.bare_server import BareServer
from bench.h2load import H2Spec, failed_during, grpc_frame, run_h2load, run_h2load_paced
from bench.h2load import available as h2load_available
from bench.load import LoadSpec, _request, run_load
from bench.rows import (
    AnyRow,
    BundleRow,
    Call,
    CallRow,
    Load,
    PhysicalRow,
    Server,
    Slice,
    SlicedRow,
    TokenBracket,
    TokenPacedRow,
    TokenRow,
)
from bench.setup import KEY_2048, KEY_3072, DaemonSettings, launch, make_bench_token
from bench.slices import Kept, Target, alternate, connection_split, quartiles, slice_ratios
from tests.harness import Daemon, TokenDir

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


def _token_args(token: TokenDir, key: str) -> list[str]:
    """bench.inprocess's arguments naming the bench token and a key on it."""
    return [
        "--conf",
        str(token.conf),
        "--label",
        token.label,
        "--pin-file",
        str(token.pin_file),
        "--key",
        key,
    ]


def _rates(r: dict[str, Any]) -> dict[str, Any]:
    """The RateRow fields of a bench.inprocess result, and the rest as details."""
    fields = ("ops_per_s", "p50_ms", "p99_ms", "cores")
    return {
        **{k: r.get(k) for k in fields},
        "details": {k: v for k, v in r.items() if k not in (*fields, "threads")},
    }


def physical_limit(bits: int, duration: float) -> PhysicalRow:
    threads = os.cpu_count() or 1
    r = _inprocess(
        ["physical", "--bits", str(bits), "--threads", str(threads), "--duration", str(duration)]
    )
    return PhysicalRow(
        name=f"physical: OpenSSL RSA-{bits}, {threads} threads",
        bits=bits,
        threads=int(r.get("threads", threads)),
        **_rates(r),
    )


def token_limit(token: TokenDir, bits: int, threads: list[int], duration: float) -> TokenRow:
    key = KEY_2048 if bits == 2048 else KEY_3072
    runs = []
    for n in threads:
        r = _inprocess(
            [
                "token",
                *_token_args(token, key),
                "--threads",
                str(n),
                "--duration",
                str(duration),
            ]
        )
        runs.append(r)
        print(f"  token RSA-{bits} {n} threads: {r['ops_per_s']:.0f}/s", flush=True)
    best = max(runs, key=lambda r: r["ops_per_s"])
    return TokenRow(
        name=f"token: python-pkcs11 RSA-{bits}, best of {threads} threads ({best['threads']})",
        bits=bits,
        threads=int(best["threads"]),
        sweep={str(r["threads"]): r["ops_per_s"] for r in runs},
        **_rates(best),
    )


class Bracket:
    """The token limit measured right before and right after each daemon row (the 'after'
    probe is the next row's 'before'), so a row's ratio does not depend on how the shared
    machine's speed drifted between part 2 and that row."""

    def __init__(self, token: TokenDir, duration: float, key: str = KEY_2048) -> None:
        self.token, self.duration, self.key = token, min(duration, 3.0), key
        self.threads = os.cpu_count() or 1
        self.last: dict[str, Any] | None = None

    def probe(self) -> dict[str, Any]:
        r = _inprocess(
            [
                "token",
                *_token_args(self.token, self.key),
                "--threads",
                str(self.threads),
                "--duration",
                str(self.duration),
            ]
        )
        return {"ops_per_s": r["ops_per_s"], "p50_ms": r["p50_ms"]}

    def around(self, make_row: Callable[[], CallRow]) -> CallRow:
        before = self.last or self.probe()
        row = make_row()
        after = self.probe()
        self.last = after
        row.token_bracket = TokenBracket(
            ops_per_s=(before["ops_per_s"] + after["ops_per_s"]) / 2,
            p50_ms=(before["p50_ms"] + after["p50_ms"]) / 2,
            before=before["ops_per_s"],
            after=after["ops_per_s"],
            threads=self.threads,
        )
        return row


def _bits(key: str) -> int:
    return 3072 if key == KEY_3072 else 2048


def daemon_row(name: str, spec: LoadSpec, pid: int) -> CallRow:
    r = run_load(spec, pid)
    r.pop("latencies_ms")
    row = CallRow(
        name=name,
        server=Server.HSMSIGND,
        call=Call(spec.call),
        callers=spec.callers,
        load=Load.PYTHON,
        bits=_bits(spec.key),
        batch=spec.batch,
        paced=spec.rate is not None,
        rate=spec.rate,
        ops_per_s=r["ops_per_s"],
        calls_per_s=r["calls_per_s"],
        p50_ms=r["p50_ms"],
        p99_ms=r["p99_ms"],
        cores=r["daemon_cpu_seconds"] / spec.duration,
        client_cores=r["client_cpu_seconds"] / spec.duration,
        details={k: r[k] for k in ("spec", "calls", "errors")},
    )
    if r["errors"]:
        # A row whose calls failed measures nothing: say so instead of printing its rate.
        row.not_available = f"{spec.call}: calls failed {r['errors']}"
    _print_row(row)
    return row


def _print_row(r: CallRow) -> None:
    failed = f" {r.not_available}" if r.not_available else ""
    print(
        f"  {r.name}: {r.ops_per_s:.0f} sig/s, {r.calls_per_s:.0f} calls/s, "
        f"p50 {r.p50_ms or 0:.2f} ms p99 {r.p99_ms or 0:.2f} ms, "
        f"daemon {r.cores or 0:.2f} cores{failed}",
        flush=True,
    )


#: h2load rows: (call, method, connections, signatures per call, name).
H2_ROWS = [
    ("unary", "hsmsign.v1.Signer/SignDigest", 1, 1, "unary SignDigest, 1 caller"),
    ("unary", "hsmsign.v1.Signer/SignDigest", 64, 1, "unary SignDigest, 64 callers"),
    ("seal", "hsmsign.v1.Signer/SealBundle", 64, 2, "Capgo SealBundle (2 signatures), 64 callers"),
    ("health", "grpc.health.v1.Health/Check", 64, 0, "gRPC alone: health Check, 64 callers"),
    ("floor", "hsmsign.v1.Signer/GetPublicKey", 64, 0, "gRPC floor: GetPublicKey, 64 callers"),
]


class Served(Protocol):
    """What the h2load rows need of a server: hsmsignd (tests.harness.Daemon) or the bare
    stack (bench.bare_server.BareServer)."""

    @property
    def address(self) -> str: ...

    @property
    def proc(self) -> subprocess.Popen[Any]: ...

    def log(self) -> str: ...


def _h2_details(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("spec", "calls", "http_failed", "daemon_cpu_seconds", "wall_seconds")
    return {k: r[k] for k in keep if k in r}


def _failed_during(
    d: Served, server: Server, method: str, before: str, calls: int
) -> dict[str, int]:
    """The failed calls of ``method`` during a row (bench.h2load.failed_during). The bare
    stack keeps no log: its failures are caught by a real call."""
    if server is not Server.HSMSIGND:
        return {}
    return failed_during(d.log, method, before, calls)


def h2_row(
    d: Served,
    call: str,
    method: str,
    connections: int,
    sigs: int,
    name: str,
    duration: float,
    server: Server = Server.HSMSIGND,
) -> CallRow:
    """One row with nghttp2's h2load as the load generator (bench/h2load.py)."""
    spec = LoadSpec(d.address, call, KEY_2048, connections)
    _method, message = _request(spec)
    before = d.log()
    r = run_h2load(
        H2Spec(d.address, method, connections, 1, max(1, round(duration))),
        grpc_frame(message),
        d.proc.pid,
    )
    failed = _failed_during(d, server, method.rsplit("/", 1)[1], before, r["calls"])
    row = CallRow(
        name=f"{name} (h2load)",
        server=server,
        call=Call(call),
        callers=connections,
        load=Load.H2LOAD,
        ops_per_s=r["calls_per_s"] * sigs,
        calls_per_s=r["calls_per_s"],
        p50_ms=r["p50_ms"],
        p99_ms=r["p99_ms"],
        cores=r["daemon_cores"],
        client_cores=r["client_cpu_seconds"] / r["spec"]["duration"],
        details=_h2_details(r),
    )
    if failed or r["http_failed"]:
        row.not_available = f"{call}: calls failed {failed or r['http_failed']}"
    _print_row(row)
    return row


def daemon_rows(
    root: Path,
    token: TokenDir,
    s: DaemonSettings,
    duration: float,
    tag: str = "",
    bare: BareServer | None = None,
    rounds: int = 1,
) -> list[CallRow | TokenPacedRow]:
    """The daemon's rows; with ``bare``, the bare stack's unary and paced rows right after
    the daemon's, so that both meet the same moment of the shared machine, and then
    ``rounds - 1`` more rounds of those four rows (``interleaved_rounds``) and of the batch
    row."""
    d = launch(root, token, s, f"daemon-{s.processes}-{s.sessions}-{s.workers}-{s.log_level}")
    rows: list[CallRow | TokenPacedRow] = []
    br = Bracket(token, duration)
    try:
        pid, addr = d.proc.pid, d.address

        def spec(call: str, callers: int, **kw: Any) -> LoadSpec:
            return LoadSpec(addr, call, kw.pop("key", KEY_2048), callers, duration=duration, **kw)

        if h2load_available():
            for call, method, conns, sigs, name in H2_ROWS:
                rows.append(
                    br.around(
                        functools.partial(
                            h2_row, d, call, method, conns, sigs, f"{tag}{name}", duration
                        )
                    )
                )
                if bare is not None and call == "unary" and conns == 64:
                    rows.append(bare_row(bare, br, duration))
        for c in (1, 16, 64):
            name = f"{tag}unary SignDigest, {c} callers (Python)"
            rows.append(br.around(functools.partial(daemon_row, name, spec("unary", c), pid)))
        max_unary = max(
            r.calls_per_s
            for r in rows
            if isinstance(r, CallRow) and r.server is Server.HSMSIGND and r.call is Call.UNARY
        )
        # Each batch caller on its own connection, as 4 build agents would be: with 2
        # connections, both land on one serving process half the time.
        batch = spec("batch", 4, batch=64, callers_per_connection=1)
        batch_name = f"{tag}batch SignDigests x64, 4 callers"
        rows.append(br.around(lambda: daemon_row(batch_name, batch, pid)))
        # Like the unary and paced rows, the batch target is judged on the median of
        # ``rounds`` rows: one 4 s row moves by 5-10% with the shared machine (0.91-1.04).
        for k in range(2, rounds + 1):
            name = f"round {k}, hsmsignd: {batch_name}"
            r = br.around(functools.partial(daemon_row, name, batch, pid))
            r.round = k
            rows.append(r)
        rows.append(
            daemon_row(
                f"{tag}batch SignDigests x64, 4 callers, RSA-3072",
                spec("batch", 4, batch=64, key=KEY_3072, callers_per_connection=1),
                pid,
            )
        )
        br.last = None  # time passed without a probe
        rows.append(
            br.around(
                lambda: daemon_row(
                    f"{tag}Capgo SealBundle (2 signatures), 64 callers (Python)",
                    spec("seal", 64),
                    pid,
                )
            )
        )
        for call, what in (
            ("health", "gRPC alone: health Check (no hsmsign code)"),
            ("floor", "gRPC floor: GetPublicKey (no token work)"),
        ):
            rows.append(daemon_row(f"{tag}{what}, 64 callers (Python)", spec(call, 64), pid))
        br.last = None
        half = max_unary / 2
        # Paced load needs an even schedule: the Python generator sends each call at its
        # time and counts latency from then (h2load's --rps sends in bursts).
        rows.append(
            br.around(
                lambda: daemon_row(
                    f"{tag}unary paced at half max ({half:.0f} calls/s), 16 callers (Python)",
                    spec("unary", 16, rate=half),
                    pid,
                )
            )
        )
        if h2load_available():
            rows.append(
                br.around(lambda: h2_paced_row(d, half, f"{tag}unary paced at half max", duration))
            )
            if bare is not None:
                rows.append(bare_row(bare, br, duration, half))
                rows += interleaved_rounds(d, bare, br, duration, half, rounds)
        rows.append(token_paced_row(token, half, duration))
    finally:
        d.stop()
    for row in rows:
        if isinstance(row, CallRow) and not row.settings:
            row.settings = s.describe()
    return rows


#: Digests per call of the audit rows: a build agent's batch.
AUDIT_BATCH = 256
#: Callers of the audit rows' unary calls (as make bench-audit's unary rows).
AUDIT_UNARY_CALLERS = 16
#: Part 3c's slices: pairs (one slice per daemon each), seconds per daemon slice and per
#: token probe; with --quick the second. A pair takes about 6 s (two probes, two slices and
#: the drain of the calls in flight), so the full part is about 2 minutes of slices.
AUDIT_SLICES = {False: (20, 1.5, 1.0), True: (8, 1.0, 1.0)}


def audit_rows(
    root: Path, token: TokenDir, duration: float, rounds: int, quick: bool = False
) -> list[CallRow]:
    """Part 3c: batch SignDigests x256 at 4 callers with the audit trail on, beside the same
    daemon with it off, in slices that alternate with the token probe (``sliced_audit_rows``):
    the issue's "batch signing >= 95% of the token limit with audit on", and what audit costs
    a batch (bench.report's audit target); then ``rounds`` interleaved rounds (which goes
    first alternates) of unary SignDigest at 16 callers on and off: what audit costs a single
    call (every call waits for its record's fsync)."""
    daemons = {
        audit: launch(root, token, DaemonSettings(audit=audit), f"daemon-audit-{audit}")
        for audit in (False, True)
    }
    rows: list[CallRow] = []
    try:
        pairs, slice_s, probe_s = AUDIT_SLICES[quick]
        rows += sliced_audit_rows(token, daemons, pairs, slice_s, probe_s)
        for k in range(1, rounds + 1):
            for audit in (True, False) if k % 2 else (False, True):
                d = daemons[audit]
                unary = LoadSpec(
                    d.address, "unary", KEY_2048, AUDIT_UNARY_CALLERS, duration=duration
                )
                name = (
                    f"round {k}, audit {'on' if audit else 'off'}: "
                    f"unary SignDigest, {AUDIT_UNARY_CALLERS} callers"
                )
                u = daemon_row(name, unary, d.proc.pid)
                u.round, u.settings = k, DaemonSettings(audit=audit).describe()
                rows.append(u)
    finally:
        for d in daemons.values():
            d.stop()
    return rows


def _audit_name(audit: bool) -> str:
    return f"audit {'on' if audit else 'off'}"


def sliced_audit_rows(
    token: TokenDir,
    daemons: dict[bool, Daemon],
    pairs: int,
    slice_seconds: float,
    probe_seconds: float,
) -> list[SlicedRow]:
    """Batch SignDigests x256 at 4 callers (one connection each) against the audit-on and
    the audit-off daemon, alternating with the token probe: probe, on, probe, off, probe, ...
    ``pairs`` times, the probe (as many threads as Bracket) and one load driver per daemon
    kept up throughout (bench.slices). Each slice's ratio is its rate over the mean of the
    probes around it; a row's figure is the median of its slices' ratios.

    The token limit on this host moves by ±15% within a minute; a slice and its two probes
    lie within a few seconds, so each ratio compares them at one host speed."""
    threads = os.cpu_count() or 1
    probe = Kept(
        [
            "-m",
            "bench.inprocess",
            "token-slices",
            *_token_args(token, KEY_2048),
            "--threads",
            str(threads),
        ],
        "token probe",
    )
    drivers: dict[str, Kept] = {}
    try:
        for audit, d in daemons.items():
            drivers[_audit_name(audit)] = Kept(
                [
                    "-m",
                    "bench.slices",
                    "load",
                    "--target",
                    d.address,
                    "--key",
                    KEY_2048,
                    "--callers",
                    "4",
                    "--batch",
                    str(AUDIT_BATCH),
                    "--daemon-pid",
                    str(d.proc.pid),
                ],
                f"load driver ({_audit_name(audit)})",
            )
        targets = [
            Target(_audit_name(audit), daemons[audit].address, daemons[audit].proc.pid)
            for audit in (True, False)
        ]

        def splits() -> dict[str, list[int]]:
            return {t.name: connection_split(drivers[t.name].proc.pid, t.pid) for t in targets}

        split_before, load_before = splits(), os.getloadavg()
        print(
            f"  {pairs} pairs of {slice_seconds:g} s slices, token probe {probe_seconds:g} s "
            f"({threads} threads) before and after each; connections per serving process "
            f"{split_before}; load average {load_before[0]:.2f}",
            flush=True,
        )
        run = alternate(probe, drivers, targets, pairs, slice_seconds, probe_seconds)
        split_after, load_after = splits(), os.getloadavg()
    finally:
        for k in (probe, *drivers.values()):
            k.stop()
    probes = run["probes"]
    rates = [p["ops_per_s"] for p in probes]
    probe_cpu: list[float | None] = [
        float(p["cpu_seconds"]) / p["signed"] if p["signed"] else None for p in probes
    ]
    probe_cores = [float(p["cpu_seconds"]) / p["wall_seconds"] for p in probes]
    probe_cpu_ms = [1000 * c for c in probe_cpu if c is not None]

    def cpu_ratio(r: dict[str, Any]) -> float | None:
        """The probes' CPU per signature around a slice over the daemon's in its window."""
        around = [probe_cpu[r["probe_before"]], probe_cpu[r["probe_after"]]]
        known: list[float] = [c for c in around if c is not None]
        inside = float(r["signatures"])
        if not known or not inside or r["daemon_window_cpu_seconds"] is None:
            return None
        return (sum(known) / len(known)) / (float(r["daemon_window_cpu_seconds"]) / inside)

    def core_ratio(r: dict[str, Any]) -> float | None:
        """The daemon's cores in a slice's window over the probes' around it."""
        around: float = (probe_cores[r["probe_before"]] + probe_cores[r["probe_after"]]) / 2
        if not around or r["daemon_window_cpu_seconds"] is None:
            return None
        cores = float(r["daemon_window_cpu_seconds"]) / float(r["seconds"])
        return cores / around

    rows: list[SlicedRow] = []
    for audit in (True, False):
        name = _audit_name(audit)
        answers = run["slices"][name]
        slices = [
            Slice(
                pair=r["pair"],
                ops_per_s=r["ops_per_s"],
                probe_before=rates[r["probe_before"]],
                probe_after=rates[r["probe_after"]],
                ratio=slice_ratios(
                    [rates[r["probe_before"]], rates[r["probe_after"]]], [r["ops_per_s"]]
                )[0],
                calls=r["calls"],
                signed=r["signed"],
                wall_seconds=r["wall_seconds"],
                daemon_cpu_seconds=r["daemon_cpu_seconds"],
                client_cpu_seconds=r["cpu_seconds"],
                p50_ms=r["p50_ms"],
                daemon_window_cpu_seconds=r["daemon_window_cpu_seconds"],
                cpu_ratio=cpu_ratio(r),
                core_ratio=core_ratio(r),
            )
            for r in answers
            if not r["errors"]
        ]
        errors: dict[str, int] = {}
        for r in answers:
            for code, n in r["errors"].items():
                errors[code] = errors.get(code, 0) + n
        q = quartiles([s.ratio for s in slices])
        cq = quartiles([s.cpu_ratio for s in slices if s.cpu_ratio is not None])
        kq = quartiles([s.core_ratio for s in slices if s.core_ratio is not None])
        wall = sum(s.wall_seconds for s in slices) or 1.0
        window = slice_seconds * len(slices) or 1.0
        daemon_ms = [1000 * s.daemon_cpu_seconds / s.signed for s in slices if s.signed]
        row = SlicedRow(
            name=(
                f"{name}: batch SignDigests x{AUDIT_BATCH}, 4 callers, "
                f"{len(answers)} slices of {slice_seconds:g} s between token probes"
            ),
            server=Server.HSMSIGND,
            settings=DaemonSettings(audit=audit).describe(),
            call=Call.BATCH,
            callers=4,
            load=Load.PYTHON,
            batch=AUDIT_BATCH,
            ops_per_s=statistics.median([s.ops_per_s for s in slices]) if slices else 0.0,
            calls_per_s=sum(s.calls for s in slices) / window,
            p50_ms=statistics.median([s.p50_ms for s in slices if s.p50_ms is not None])
            if slices
            else None,
            cores=sum(s.daemon_cpu_seconds for s in slices) / wall,
            client_cores=sum(s.client_cpu_seconds for s in slices) / wall,
            slices=slices,
            slice_seconds=slice_seconds,
            probe_seconds=probe_seconds,
            ratio_q1=q[0] if q else None,
            ratio_median=q[1] if q else None,
            ratio_q3=q[2] if q else None,
            cpu_ratio_q1=cq[0] if cq else None,
            cpu_ratio_median=cq[1] if cq else None,
            cpu_ratio_q3=cq[2] if cq else None,
            core_ratio_q1=kq[0] if kq else None,
            core_ratio_median=kq[1] if kq else None,
            core_ratio_q3=kq[2] if kq else None,
            details={
                "probes": [round(x, 1) for x in rates],
                "probe_cores": [round(x, 3) for x in probe_cores],
                "probe_threads": threads,
                "probe_cpu_ms_per_signature": statistics.median(probe_cpu_ms)
                if probe_cpu_ms
                else None,
                "daemon_cpu_ms_per_signature": statistics.median(daemon_ms) if daemon_ms else None,
                "connections_per_serving_process": {
                    "before": split_before[name],
                    "after": split_after[name],
                },
                "loadavg": {"before": load_before, "after": load_after},
                "errors": errors,
            },
        )
        if errors or not slices:
            row.not_available = f"batch: calls failed {errors}" if errors else "no slices"
        rows.append(row)
        print(
            f"  {row.name}: median {row.ratio_median or 0:.3f} of the token "
            f"(IQR {row.ratio_q1 or 0:.3f}-{row.ratio_q3 or 0:.3f}), "
            f"{row.ops_per_s:.0f} sig/s median, daemon {row.cores or 0:.2f} cores, "
            f"{row.details['daemon_cpu_ms_per_signature'] or 0:.3f} ms CPU per signature "
            f"(the probe {row.details['probe_cpu_ms_per_signature'] or 0:.3f}); per slice, "
            f"in its window: CPU per signature, probe / daemon, median "
            f"{row.cpu_ratio_median or 0:.3f} (IQR {row.cpu_ratio_q1 or 0:.3f}-"
            f"{row.cpu_ratio_q3 or 0:.3f}); cores, daemon / probe, median "
            f"{row.core_ratio_median or 0:.3f} (IQR {row.core_ratio_q1 or 0:.3f}-"
            f"{row.core_ratio_q3 or 0:.3f})"
            + (f" {row.not_available}" if row.not_available else ""),
            flush=True,
        )
    print(
        f"  token probe {min(rates):.0f}-{max(rates):.0f} sig/s over {len(rates)} probes; "
        f"load average {load_after[0]:.2f} at the end",
        flush=True,
    )
    return rows


def token_paced_row(token: TokenDir, rate: float, duration: float) -> TokenPacedRow:
    """The token alone at the paced rows' rate: the latency that queueing on the token's
    own cores costs before any gRPC, the reference for the daemon's paced p99."""
    threads = os.cpu_count() or 1
    r = _inprocess(
        [
            "token-paced",
            *_token_args(token, KEY_2048),
            "--threads",
            str(threads),
            "--rate",
            f"{rate:.1f}",
            "--duration",
            str(duration),
        ]
    )
    row = TokenPacedRow(
        name=f"token alone paced at the same rate ({rate:.0f}/s), {threads} threads",
        bits=2048,
        threads=threads,
        rate=rate,
        ops_per_s=r["ops"] / duration,
        p50_ms=r["p50_ms"],
        p99_ms=r["p99_ms"],
    )
    print(f"  {row.name}: p50 {row.p50_ms or 0:.2f} ms p99 {row.p99_ms or 0:.2f} ms", flush=True)
    return row


def h2_paced_row(
    d: Served, rate: float, name: str, duration: float, server: Server = Server.HSMSIGND
) -> CallRow:
    _method, message = _request(LoadSpec(d.address, "unary", KEY_2048, 1))
    before = d.log()
    r = run_h2load_paced(
        d.address,
        "hsmsign.v1.Signer/SignDigest",
        grpc_frame(message),
        rate,
        duration,
        d.proc.pid,
    )
    failed = _failed_during(d, server, "SignDigest", before, r["calls"])
    row = _paced_call_row(r, f"{name} ({rate:.0f} calls/s), 8 callers (h2load)", server)
    row.client_cores = r["client_cpu_seconds"] / duration
    if failed or r["http_failed"]:
        row.not_available = f"paced: calls failed {failed or r['http_failed']}"
    _print_row(row)
    return row


def _paced_call_row(r: dict[str, Any], name: str, server: Server) -> CallRow:
    """A CallRow from bench.h2load.run_h2load_paced's result (8 connections)."""
    return CallRow(
        name=name,
        server=server,
        call=Call.UNARY,
        callers=8,
        load=Load.H2LOAD,
        paced=True,
        rate=r["rate"],
        ops_per_s=r["calls_per_s"],
        calls_per_s=r["calls_per_s"],
        p50_ms=r["p50_ms"],
        p99_ms=r["p99_ms"],
        cores=r["daemon_cores"],
        details=_h2_details(r),
    )


def bare_row(bare: BareServer, br: Bracket, duration: float, rate: float | None = None) -> CallRow:
    """The daemon's unary-64 row (or, with ``rate``, its paced row) against
    bench/bare_server.py, right after the daemon's own: grpcio + protobuf + python-pkcs11 on
    the same token with the daemon's process layout and none of hsmsign's code. What
    separates the token limit from this row is the stack's cost per call on these cores;
    what separates this row from the daemon's is hsmsign's."""
    return _target_row(bare, br, duration, rate, BARE, Server.BARE)


def _target_row(
    s: Served,
    br: Bracket,
    duration: float,
    rate: float | None,
    label: str,
    server: Server = Server.HSMSIGND,
) -> CallRow:
    """Unary SignDigest at 64 callers, or paced at ``rate``: a row of the unary or the p99
    target, bracketed by the token."""
    if rate is None:
        name = f"{label}: unary SignDigest, 64 callers"
        row = br.around(lambda: h2_row(s, "unary", SIGN_DIGEST, 64, 1, name, duration, server))
    else:
        paced = f"{label}: unary paced at half max"
        row = br.around(lambda: h2_paced_row(s, rate, paced, duration, server))
    if server is Server.BARE:
        row.settings = "bare stack"
    return row


#: The method the unary and paced rows call.
SIGN_DIGEST = "hsmsign.v1.Signer/SignDigest"
#: The bare stack rows' name.
BARE = "bare stack (grpcio + python-pkcs11, no hsmsign code)"


def interleaved_rounds(
    d: Served,
    bare: BareServer,
    br: Bracket,
    duration: float,
    rate: float,
    rounds: int,
) -> list[CallRow]:
    """Rounds 2..``rounds`` of the rows the unary and p99 targets read: unary at 64 callers
    and paced at ``rate``, for hsmsignd and for the bare stack, each row bracketed by the
    token. Which server goes first alternates from round to round.

    One 4 s row on this shared machine moves by 10-20% from one minute to the next (single
    rounds of the bare stack ranged 0.62-0.81 of the token limit), which is the size of the
    differences these targets decide; bench.report judges them on the median of the rounds.
    """
    servers: list[tuple[Server, str, Served]] = [
        (Server.HSMSIGND, "hsmsignd", d),
        (Server.BARE, "bare stack", bare),
    ]
    rows: list[CallRow] = []
    for k in range(2, rounds + 1):
        order = servers[::-1] if k % 2 == 0 else servers
        for kind_rate in (None, rate):
            for who, label, s in order:
                r = _target_row(s, br, duration, kind_rate, f"round {k}, {label}", who)
                r.round = k
                rows.append(r)
    return rows


#: The p99 floor rows' name.
FLOOR = "gRPC alone (no signing), the token signing as often in another process"


def p99_floor_rows(
    token: TokenDir, duration: float, rate: float, rounds: int, key: str = KEY_2048
) -> list[CallRow]:
    """Part 3b: the p99 the stack allows on these cores before any server design.

    A signing call goes through what a gRPC call that signs nothing goes through, and waits
    for a signature too. Here the two run side by side in separate processes, nothing handed
    between them: ``bench/bare_server.py --no-sign`` (grpcio in the daemon's layout, no
    token call) under the p99 rows' even schedule at ``rate``, while the token signs
    ``rate``/s on its own threads (``bench/inprocess.py token-paced``), so that the cores
    carry the same signatures as in the p99 rows. The no-op call's p99, over the token p50
    measured around it, is what gRPC alone reaches here under that load; the p99 target is
    read against it. One row per round, bracketed by the token like the daemon's rows.
    """
    noop = BareServer(_token_args(token, key), "--no-sign")
    br = Bracket(token, duration, key)
    rows: list[CallRow] = []
    try:
        for k in range(1, rounds + 1):
            name = f"round {k}, {FLOOR}: paced at half max ({rate:.0f}/s)"
            r = br.around(functools.partial(_beside_token, noop, token, key, rate, duration, name))
            r.round = k
            rows.append(r)
            print(
                f"  {r.name}: "
                + (
                    r.not_available
                    if r.not_available
                    else f"gRPC p50 {r.p50_ms or 0:.2f} ms p99 {r.p99_ms or 0:.2f} ms; "
                    f"the token's own p99 {r.token_p99_ms or 0:.2f} ms"
                ),
                flush=True,
            )
    finally:
        noop.stop()
    return rows


def _beside_token(
    noop: BareServer, token: TokenDir, key: str, rate: float, duration: float, name: str
) -> CallRow:
    """The no-op gRPC server paced at ``rate`` while the token signs ``rate``/s in another
    process. The token's measured window (it starts later and stops earlier) lies inside
    h2load's."""
    signed: dict[str, Any] = {}

    def sign() -> None:
        time.sleep(0.5)  # h2load's processes start first; its warm-up is 1 s
        signed.update(
            _inprocess(
                [
                    "token-paced",
                    *_token_args(token, key),
                    "--rate",
                    f"{rate:.1f}",
                    "--threads",
                    str(os.cpu_count() or 1),
                    "--duration",
                    str(max(1.0, duration - 1.0)),
                ]
            )
        )

    t = threading.Thread(target=sign, name="token-beside")
    t.start()
    try:
        _method, message = _request(LoadSpec(noop.address, "unary", key, 1))
        r = run_h2load_paced(
            noop.address, SIGN_DIGEST, grpc_frame(message), rate, duration, noop.proc.pid
        )
    finally:
        t.join()
    row = _paced_call_row(r, name, Server.NOOP)
    row.settings = "p99 floor"
    # h2load's CPU cannot be told apart from the token process's here: both are this
    # process's children, and the token's is reaped inside h2load's measuring window.
    row.client_cores = None
    row.token_p50_ms, row.token_p99_ms = signed.get("p50_ms"), signed.get("p99_ms")
    if r["http_failed"]:
        row.not_available = f"no-op calls failed: {r['http_failed']}"
    elif not signed:
        row.not_available = "the token beside it did not finish (its error is above)"
    return row


def _check_bare(address: str) -> None:
    """One real call: h2load sees HTTP 200 even for a failed gRPC call, and the bare server
    keeps no access log to count failures from."""
    import grpc

    from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc

    _method, message = _request(LoadSpec(address, "unary", KEY_2048, 1))
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.SignerStub(channel).SignDigest(message, timeout=30)
    if len(reply.signature) != 256:
        raise RuntimeError(f"the bare server answered a {len(reply.signature)}-byte signature")


def single_process_row(root: Path, token: TokenDir, duration: float) -> list[CallRow]:
    """The previous design beside the shipped one: every call served by one process."""
    if not h2load_available():
        return []
    s = DaemonSettings(processes=1, sessions=4, workers=32)
    d = launch(root, token, s, "daemon-single-process")
    try:
        r = Bracket(token, duration).around(
            lambda: h2_row(
                d,
                "unary",
                "hsmsign.v1.Signer/SignDigest",
                64,
                1,
                "one serving process (4 sessions, 32 threads): unary SignDigest, 64 callers",
                duration,
            )
        )
    finally:
        d.stop()
    r.settings = s.describe()
    return [r]


def bundle_rows(quick: bool) -> list[BundleRow]:
    """Part 4, with bench/bench_bundle_encrypt.py's contenders: the same random file through
    hsmsign's encrypt_bundle, openssl enc and the Capgo CLI."""
    from bench import bench_bundle_encrypt as bbe
    from hsmsign import capgo

    rows: list[BundleRow] = []
    repeat = 1 if quick else 3
    for size_mb in (1, 100):
        with tempfile.TemporaryDirectory(prefix="hsmsign-bench-bundle-") as tmp:
            work = Path(tmp)
            src = work / "bundle.zip"
            bbe.make_file(src, size_mb << 20)
            key, iv = capgo.new_session_material()
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
                        BundleRow(
                            name=name,
                            tool=tool,
                            size_mb=size_mb,
                            not_available=f"{tool} not installed or not runnable",
                        )
                    )
                    continue
                rows.append(
                    BundleRow(
                        name=name,
                        tool=tool,
                        size_mb=size_mb,
                        seconds=run.seconds,
                        mb_per_s=size_mb / run.seconds,
                        peak_rss_mb=run.rss_mib,
                        startup_seconds=cli[1] if tool == "capgo" and cli else None,
                    )
                )
                print(
                    f"  {name}: {size_mb / run.seconds:.0f} MB/s ({run.seconds:.3f} s)", flush=True
                )
    return rows


def all_parts(
    root: Path, token: TokenDir, duration: float, rounds: int, quick: bool, sweep: bool
) -> list[AnyRow]:
    """Parts 1 to 4 (bench/README.md) on the bench token under ``root``."""
    rows: list[AnyRow] = []
    print("1. physical limit (OpenSSL in-process)", flush=True)
    for bits in (2048, 3072):
        rows.append(physical_limit(bits, duration))
    print("2. token limit (python-pkcs11 in-process, through p11-kit-proxy)", flush=True)
    reference = token_limit(token, 2048, [1, 2] if quick else [1, 2, 4], duration)
    rows.append(reference)
    rows.append(token_limit(token, 3072, [2] if quick else [1, 2], duration))
    print("3. the daemon (h2load, then 2 Python gRPC client processes)", flush=True)
    if not h2load_available():
        print("  h2load not found (Debian: nghttp2-client): Python clients only", flush=True)
    bare = BareServer(_token_args(token, KEY_2048)) if h2load_available() else None
    try:
        if bare is not None:
            _check_bare(bare.address)
        rows += daemon_rows(root, token, DaemonSettings(), duration, bare=bare, rounds=rounds)
        if bare is not None:
            _check_bare(bare.address)  # still signing after its rows: they measured calls
    finally:
        if bare is not None:
            bare.stop()
    paced = next(
        (
            r
            for r in rows
            if isinstance(r, CallRow)
            and r.server is Server.HSMSIGND
            and r.paced
            and r.load is Load.H2LOAD
        ),
        None,
    )
    if paced is not None and paced.measured and paced.rate is not None:
        print("3b. the p99 floor: gRPC with no signing, the token beside it", flush=True)
        rows += p99_floor_rows(token, duration, paced.rate, rounds)
    rows += single_process_row(root, token, duration)
    print("3c. batch signing with the audit trail on and off", flush=True)
    rows += audit_rows(root, token, duration, rounds, quick)
    # Again after the daemon rows: the machine is shared, so the reference drifts; the
    # targets use the mean of both token measurements.
    best = reference.threads
    again = token_limit(token, 2048, [best], duration)
    again.name = f"token: python-pkcs11 RSA-2048, {best} threads, again after the daemon"
    again.after_daemon = True
    rows.append(again)
    if sweep:
        for s in (
            DaemonSettings(sessions=1),
            DaemonSettings(sessions=4),
            DaemonSettings(workers=2),
            DaemonSettings(workers=8),
        ):
            rows += daemon_rows(root, token, s, duration, tag=f"[{s.describe()}] ")
    print("4. bundle encryption", flush=True)
    rows += bundle_rows(quick)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="short runs: 1.5 s per configuration, 1 round (about 2-3 minutes)",
    )
    p.add_argument("--duration", type=float, default=None, help="seconds per configuration")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also run the daemon rows with sessions=1 and 4, workers=2 and 8",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the rows the batch, unary and p99 targets read (unary and paced "
        "with hsmsignd and the bare stack interleaved) and of the p99 floor; the targets use "
        "the median (default 3, 1 with --quick)",
    )
    p.add_argument(
        "--only",
        choices=["audit"],
        default=None,
        help="run one part alone: audit = part 3c (batch signing with the audit trail on "
        "and off, in slices alternating with the token probe, and the unary rows)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    rounds = a.rounds if a.rounds is not None else (1 if a.quick else 3)
    if rounds < 1:
        p.error("--rounds must be at least 1")
    duration = a.duration or (1.5 if a.quick else 4.0)
    t0 = time.time()
    rows: list[AnyRow] = []
    with tempfile.TemporaryDirectory(prefix="hsmsign-bench-") as tmp:
        root = Path(tmp)
        print("making the bench token and keys...", flush=True)
        token = make_bench_token(root)
        if a.only == "audit":
            print("3c. batch signing with the audit trail on and off", flush=True)
            rows += audit_rows(root, token, duration, rounds, a.quick)
        else:
            rows += all_parts(root, token, duration, rounds, a.quick, a.sweep)
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
        "rows": [r.to_json() for r in rows],
    }
    result["targets"] = report.targets(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    print()
    print(report.table(result, rows))
    try:
        report.chart(result, rows, a.out / "results.png")
        print(f"\nwrote {a.out / 'results.json'} and {a.out / 'results.png'}")
    except ImportError:
        print(f"\nwrote {a.out / 'results.json'} (matplotlib missing: no chart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
