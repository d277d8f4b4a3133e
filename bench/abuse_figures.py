"""Two figures from issue #17, measured again after the fixes (``python -m bench.abuse_figures``):

1. **Signatures for callers who had gone.** 300 callers (h2load: 300 HTTP/2 connections, one
   unary SignDigest in flight on each, closed loop) with ``grpc-timeout: 50m`` on every call,
   for ``--seconds``, against the shipped defaults with the audit trail off, then on; first the
   same load without a deadline, for reference. Afterwards the daemon is stopped and each
   serving process's stop-time summary (``N signatures made; calls whose caller had gone
   ...``) is summed. h2load cannot read gRPC statuses, so what the callers got is read on the
   daemon's side: the access log (a signature whose caller had gone is still logged
   ``status=OK``) and, with audit on, the records whose outcome is ``abandoned`` (signed, but
   the caller had gone). Signatures for callers who had gone = signatures made - audit ``ok``.
2. **Unknown key names beside a real client.** One client signing with a real key (bench.load:
   2 client processes, one connection per 4 callers), 16 callers
   closed loop, alone and with about 100 requests/s naming keys that do not exist (a new name
   each time) alongside; rows interleaved, ``--rounds`` of each, which goes first alternating.

Loopback only, bounded: about 2 minutes with the defaults. Prints a table; no file written.
Ratios and counts are the figures to quote: absolute rates move with the host's load.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc

from bench.h2load import GRPC_HEADERS, grpc_frame
from bench.load import LoadSpec, run_load
from bench.setup import KEY_2048, DaemonSettings, launch, make_bench_token, wait_idle
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness import Daemon

#: Callers and deadline of figure 1, as the issue quoted them.
LATE_CALLERS = 300
LATE_DEADLINE_S = 0.05

#: Figure 2: the real client's callers, and the unknown-name requests per second beside it.
REAL_CALLERS = 16
UNKNOWN_RATE = 100.0
UNKNOWN_CONNECTIONS = 4

_SUMMARY = re.compile(
    r"(\d+) signatures made; calls whose caller had gone \(deadline passed or cancelled\): "
    r"(\d+) not run, (\d+) stopped part-way"
)
_ADMISSION = re.compile(r"admission: (\d+) calls? shed .*?; (\d+) left the queue because")
_ACCESS = re.compile(r"hsmsign\.access: SignDigest peer=\S+ status=(\w+) ")


# -- figure 1: 300 callers with 50 ms deadlines ---------------------------------------------


def _late_load(
    target: str, seconds: float, log_file: Path, deadline: float | None
) -> dict[str, Any]:
    """h2load: LATE_CALLERS connections, one call in flight on each, every call with a
    ``grpc-timeout`` of LATE_DEADLINE_S (the daemon's gRPC ends the call with
    DEADLINE_EXCEEDED when it passes). A Python client cannot send this load on 2 cores
    without its own calls expiring before they are sent."""
    body = grpc_frame(
        pb.SignDigestRequest(
            key=pb.KeyRef(name=KEY_2048),
            algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
            digest=hashlib.sha256(b"late").digest(),
        )
    )
    body_file = log_file.with_suffix(".body")
    body_file.write_bytes(body)
    cmd = [
        "h2load",
        "--duration",
        f"{seconds:g}",
        "--warm-up-time",
        "1",
        "--clients",
        str(LATE_CALLERS),
        "--max-concurrent-streams",
        "1",
        "--data",
        str(body_file),
        *GRPC_HEADERS,
        *(["--header", f"grpc-timeout: {round(deadline * 1000)}m"] if deadline else []),
        "--log-file",
        str(log_file),
        f"http://{target}/hsmsign.v1.Signer/SignDigest",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120).stdout
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done", out)
    over = 0
    answers = 0
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] == "200":
            answers += 1
            over += int(parts[2]) / 1e6 > LATE_DEADLINE_S  # a 50 ms caller would have gone
    return {"h2load_done": int(done[1]) if done else None, "answers": answers, "over": over}


def _summed_summaries(log: str) -> dict[str, int]:
    made = not_run = stopped = shed = left_queue = processes = 0
    for m in _SUMMARY.finditer(log):
        processes += 1
        made += int(m[1])
        not_run += int(m[2])
        stopped += int(m[3])
    for m in _ADMISSION.finditer(log):
        shed += int(m[1])
        left_queue += int(m[2])
    return {
        "processes": processes,
        "signatures_made": made,
        "gone_not_run": not_run,
        "gone_stopped": stopped,
        "shed": shed,
        "left_queue_caller_gone": left_queue,
    }


def _audit_outcomes(directory: Path) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    for chain in sorted(directory.glob("audit-*.jsonl")):
        for line in chain.read_text().splitlines():
            with_fields = json.loads(line) if line.startswith("{") else {}
            if with_fields.get("kind") == "call" and with_fields.get("op") == "SignDigest":
                outcomes[str(with_fields.get("outcome"))] += 1
    return outcomes


def late_signatures(
    root: Path, token: Any, audit: bool, seconds: float, deadline: float | None = LATE_DEADLINE_S
) -> dict[str, Any]:
    """Figure 1 against a fresh daemon (shipped defaults; ``audit``: the trail on;
    ``deadline`` None: calls without one, the same load's reference)."""
    name = f"late-{'audit' if audit else 'plain'}-{deadline or 'none'}"
    daemon = launch(root, token, DaemonSettings(audit=audit), name)
    try:
        load = _late_load(daemon.address, seconds, root / f"{name}.h2load.tsv", deadline)
    finally:
        daemon.stop(timeout=60)
    log = daemon.log()
    row: dict[str, Any] = {"audit": audit, "deadline": deadline, **load, **_summed_summaries(log)}
    row["access_log"] = dict(Counter(_ACCESS.findall(log)))
    if audit:
        row["audit_outcomes"] = dict(_audit_outcomes(root / f"{name}-audit"))
    return row


# -- figure 2: unknown key names beside a real client ---------------------------------------


async def _unknown_names(target: str, rate: float, stop: float, counts: Counter[str]) -> None:
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(UNKNOWN_CONNECTIONS)
    ]
    stubs = [pb_grpc.SignerStub(c) for c in channels]
    digest = hashlib.sha256(b"unknown").digest()
    alg = pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256

    async def one(i: int) -> None:
        req = pb.SignDigestRequest(
            key=pb.KeyRef(name=f"no-such-key-{os.urandom(6).hex()}"), algorithm=alg, digest=digest
        )
        try:
            await stubs[i % len(stubs)].SignDigest(req, timeout=10)
            counts["OK"] += 1
        except grpc.aio.AioRpcError as e:
            counts[e.code().name] += 1

    tasks: list[asyncio.Task[None]] = []
    due, i = time.time(), 0
    while due < stop:  # an even schedule, whatever the answers take (open loop)
        await asyncio.sleep(max(0.0, due - time.time()))
        tasks.append(asyncio.create_task(one(i)))
        i += 1
        due += 1 / rate
    await asyncio.gather(*tasks)
    for c in channels:
        await c.close()


def _real_client(daemon: Daemon, seconds: float, unknown: bool) -> dict[str, Any]:
    spec = LoadSpec(daemon.address, "unary", KEY_2048, REAL_CALLERS, duration=seconds)
    counts: Counter[str] = Counter()
    thread = None
    if unknown:
        # From before the real client's window opens (run_load spawns, then warms up) to its end.
        stop = time.time() + 1.5 + spec.warmup + seconds + 0.5
        thread = threading.Thread(
            target=lambda: asyncio.run(_unknown_names(daemon.address, UNKNOWN_RATE, stop, counts))
        )
        thread.start()
    started = time.time()
    result = run_load(spec, daemon.proc.pid)
    if thread is not None:
        thread.join(120)
    return {
        "unknown": unknown,
        "sig_per_s": result["ops_per_s"],
        "errors": result["errors"],
        "unknown_sent": sum(counts.values()),
        "unknown_per_s": sum(counts.values()) / (time.time() - started) if unknown else 0.0,
        "unknown_statuses": dict(counts),
    }


def unknown_keys(root: Path, token: Any, seconds: float, rounds: int) -> list[dict[str, Any]]:
    daemon = launch(root, token, DaemonSettings(), "unknown")
    rows: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for unknown in order:
                rows.append({"round": r + 1, **_real_client(daemon, seconds, unknown)})
                wait_idle(1.0)
    finally:
        daemon.stop(timeout=60)
    return rows


# -- the table ------------------------------------------------------------------------------


def _print_late(rows: list[dict[str, Any]], seconds: float) -> None:
    print(
        f"\n1. {LATE_CALLERS} callers (h2load connections, 1 call each in flight), unary "
        f"SignDigest, {seconds:g} s + 1 s warm-up, "
        f"shipped defaults ({rows[0]['processes']} serving processes)"
    )
    print(
        f"{'deadline':<9}{'audit':<6}{'answers':>9}{'>50ms':>8}{'sigs made':>11}{'access OK':>11}"
        f"{'access DEADLINE':>17}{'not run':>9}{'stopped':>9}{'shed':>7}  audit outcomes"
    )
    for row in rows:
        access = row["access_log"]
        deadline = "none" if row["deadline"] is None else f"{row['deadline'] * 1000:g} ms"
        print(
            f"{deadline:<9}"
            f"{'on' if row['audit'] else 'off':<6}{row['answers']:>9}{row['over']:>8}"
            f"{row['signatures_made']:>11}{access.get('OK', 0):>11}"
            f"{access.get('DEADLINE_EXCEEDED', 0):>17}{row['gone_not_run']:>9}"
            f"{row['gone_stopped']:>9}{row['shed']:>7}  {row.get('audit_outcomes', '-')}"
        )
        other = {k: v for k, v in access.items() if k not in ("OK", "DEADLINE_EXCEEDED")}
        if other:
            print(f"      other access-log statuses: {other}")
    print(
        "answers: HTTP answers h2load got (OK or a gRPC error); >50ms: answers that came after "
        "the deadline; sigs made: the daemon's stop-time count; audit 'abandoned': signed, "
        "logged OK, but the caller had gone"
    )


def _print_unknown(rows: list[dict[str, Any]], seconds: float) -> None:
    print(
        f"\n2. real client: unary SignDigest {KEY_2048}, {REAL_CALLERS} callers closed loop, "
        f"{seconds:g} s rows; beside it ~{UNKNOWN_RATE:g}/s SignDigest naming a new unknown key"
    )
    print(f"{'round':<6}{'unknown':<9}{'sig/s':>8}{'unknown/s':>11}  statuses")
    for row in rows:
        print(
            f"{row['round']:<6}{'with' if row['unknown'] else 'alone':<9}{row['sig_per_s']:>8.0f}"
            f"{row['unknown_per_s']:>11.0f}  real: {row['errors'] or 'all OK'}"
            + (f"; unknown: {row['unknown_statuses']}" if row["unknown"] else "")
        )
    alone = [r["sig_per_s"] for r in rows if not r["unknown"]]
    beside = [r["sig_per_s"] for r in rows if r["unknown"]]
    ratios = [w / a for w, a in zip(beside, alone, strict=False) if a]
    print(
        f"median alone {statistics.median(alone):.0f} sig/s, with unknown names "
        f"{statistics.median(beside):.0f} sig/s; with/alone per round: "
        + ", ".join(f"{x:.2f}" for x in ratios)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.abuse_figures", description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="figure 1's load (default 10)")
    p.add_argument("--row-seconds", type=float, default=4.0, help="figure 2's rows (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="figure 2's rounds (default 3)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hsmsign-abuse-") as tmp:
        root = Path(tmp)
        token = make_bench_token(root)
        late = [late_signatures(root, token, False, args.seconds, deadline=None)]
        late += [late_signatures(root, token, audit, args.seconds) for audit in (False, True)]
        unknown = unknown_keys(root, token, args.row_seconds, args.rounds)
    _print_late(late, args.seconds)
    _print_unknown(unknown, args.row_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
