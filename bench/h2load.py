"""Load from nghttp2's h2load: a C HTTP/2 load generator sending gRPC calls.

A Python gRPC client spends about 0.3 ms of CPU per call; on a 2-core machine that CPU is
taken from the daemon it measures. h2load spends a few hundredths of a millisecond, so its
rows show what the daemon does when its callers run elsewhere, as build agents do. The
Python client rows (bench/load.py) stay in the table beside them.

h2load only sees HTTP statuses; a gRPC error is an HTTP 200 with a grpc-status trailer. The
caller therefore checks the daemon's access log for failed calls after each run
(``failed_calls``), once the run's lines have landed: the daemon writes its log from a
thread of its own, so the last lines of a run can reach the file after h2load has exited
(``failed_during``).
"""

from __future__ import annotations

import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from bench.setup import tree_cpu_seconds

#: What makes h2load's POST a gRPC call (the body is a framed message: grpc_frame).
GRPC_HEADERS = ["--header", "content-type: application/grpc", "--header", "te: trailers"]


def available() -> bool:
    return shutil.which("h2load") is not None


def grpc_frame(message: Message) -> bytes:
    """One length-prefixed gRPC message (no compression), the body of a unary call."""
    data = message.SerializeToString()
    return b"\0" + len(data).to_bytes(4, "big") + data


@dataclass(frozen=True)
class H2Spec:
    target: str  # host:port
    method: str  # e.g. "hsmsign.v1.Signer/SignDigest"
    connections: int  # separate HTTP/2 connections, like separate callers' channels
    streams: int = 1  # calls in flight per connection
    duration: int = 4
    warmup: int = 1
    rate: float | None = None  # calls/s over all connections; None = as fast as possible


def run_h2load(spec: H2Spec, body: bytes, daemon_pid: int | None = None) -> dict[str, Any]:
    """Runs h2load; returns calls/s, p50/p99 from its per-request log, and CPU use."""
    with tempfile.TemporaryDirectory(prefix="hsmsign-h2load-") as tmp:
        body_file, log_file = Path(tmp) / "body", Path(tmp) / "requests.tsv"
        body_file.write_bytes(body)
        cmd = [
            "h2load",
            "--duration",
            str(spec.duration),
            "--warm-up-time",
            str(spec.warmup),
            "--clients",
            str(spec.connections),
            "--max-concurrent-streams",
            str(spec.streams),
            "--data",
            str(body_file),
            *GRPC_HEADERS,
            "--log-file",
            str(log_file),
        ]
        if spec.rate:
            cmd += ["--rps", f"{spec.rate / spec.connections:.3f}"]
        cmd.append(f"http://{spec.target}/{spec.method}")
        own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        cpu: list[float] = []
        started = time.time()
        if daemon_pid is not None:
            time.sleep(spec.warmup + 0.3)  # connections up, warm-up over
            cpu.append(tree_cpu_seconds(daemon_pid))
            t_cpu = time.time()
        out, _ = proc.communicate(timeout=spec.duration + spec.warmup + 120)
        if daemon_pid is not None:
            # h2load stops sending at the end of its window; measure to just before that.
            cpu.append(tree_cpu_seconds(daemon_pid))
            cpu_window = time.time() - t_cpu
        own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"h2load failed ({proc.returncode}): {out.strip()[-500:]}")
        lat = _latencies(log_file)
    rps = re.search(r"finished in [\d.]+\w*, ([\d.]+) req/s", out)
    req = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", out)
    if rps is None or req is None:
        raise RuntimeError(f"cannot read h2load's summary: {out.strip()[-500:]}")
    calls = int(req.group(3))
    # h2load's CPU over its whole run, scaled to the measured window (warm-up excluded).
    client_cpu = (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime) * (
        spec.duration / (spec.duration + spec.warmup)
    )
    return {
        "spec": asdict(spec),
        "tool": "h2load",
        "calls": calls,
        "http_failed": int(req.group(2)) - calls,
        "calls_per_s": float(rps.group(1)),
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "client_cpu_seconds": client_cpu,
        "daemon_cpu_seconds": cpu[1] - cpu[0] if len(cpu) == 2 else None,
        "daemon_cores": (cpu[1] - cpu[0]) / cpu_window if len(cpu) == 2 else None,
        "wall_seconds": time.time() - started,
    }


def _latencies(log_file: Path) -> list[float]:
    """Per-request durations (ms) from h2load's log: start µs, status, duration µs."""
    out = []
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[1] == "200":
            out.append(int(parts[2]) / 1000)
    out.sort()
    return out


def _pct(sorted_ms: list[float], p: float) -> float | None:
    if not sorted_ms:
        return None
    return sorted_ms[min(len(sorted_ms) - 1, round(p / 100 * (len(sorted_ms) - 1)))]


#: Not failures: h2load resets the streams still in flight when its duration ends, and the
#: daemon refuses (or stops) a call whose caller has gone instead of signing for nobody.
CALLER_GONE = frozenset({"CANCELLED"})


def failed_calls(log_text: str, method: str) -> dict[str, int]:
    """Status counts other than OK (and other than the caller having gone) in the daemon's
    access log for ``method``."""
    counts: dict[str, int] = {}
    for m in re.finditer(rf" {method} peer=\S+ status=(\w+)", log_text):
        if m.group(1) != "OK" and m.group(1) not in CALLER_GONE:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def _access_calls(log_text: str, method: str) -> int:
    """How many calls of ``method`` the access log records, whatever their status."""
    return len(re.findall(rf" {method} peer=\S+ status=", log_text))


def failed_during(
    read_log: Callable[[], str], method: str, before: str, calls: int, timeout: float = 15.0
) -> dict[str, int]:
    """The failed calls of ``method`` (``failed_calls``) that the access log gained since
    ``before`` (its text then), read once it holds a line for each of the ``calls`` the run
    counted, or as it stands after ``timeout`` seconds."""
    want = _access_calls(before, method) + calls
    deadline = time.monotonic() + timeout
    text = read_log()
    while _access_calls(text, method) < want and time.monotonic() < deadline:
        time.sleep(0.05)
        text = read_log()
    was, now = failed_calls(before, method), failed_calls(text, method)
    return {k: v - was.get(k, 0) for k, v in now.items() if v > was.get(k, 0)}


def run_h2load_paced(
    target: str,
    method: str,
    body: bytes,
    rate: float,
    duration: float,
    daemon_pid: int | None = None,
    connections: int = 8,
    warmup: float = 1.0,
) -> dict[str, Any]:
    """Open-loop load at ``rate`` calls/s with an even schedule, latency from each call's
    scheduled time.

    h2load's --rps sends each second's calls in a burst, and all clients of one h2load run
    the same timing script in step; so this runs one h2load per connection, each with a
    timing script shifted by 1/connections of the interval. Streams per connection are not
    limiting (64), so a call is sent at its time even when earlier ones are still out.
    """
    interval_ms = 1000.0 * connections / rate
    n = int((warmup + duration) * 1000 / interval_ms)
    uri = f"http://{target}/{method}"
    with tempfile.TemporaryDirectory(prefix="hsmsign-h2load-") as tmp:
        body_file = Path(tmp) / "body"
        body_file.write_bytes(body)
        procs, logs = [], []
        own0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        for c in range(connections):
            script, log_file = Path(tmp) / f"script-{c}", Path(tmp) / f"log-{c}"
            phase = interval_ms * c / connections
            script.write_text("".join(f"{phase + k * interval_ms:.3f}\t{uri}\n" for k in range(n)))
            logs.append(log_file)
            procs.append(
                subprocess.Popen(
                    [
                        "h2load",
                        "--max-concurrent-streams",
                        "64",
                        "--data",
                        str(body_file),
                        *GRPC_HEADERS,
                        "--timing-script-file",
                        str(script),
                        "--log-file",
                        str(log_file),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )
        cpu: list[float] = []
        if daemon_pid is not None:
            time.sleep(warmup)
            cpu.append(tree_cpu_seconds(daemon_pid))
            time.sleep(duration)
            cpu.append(tree_cpu_seconds(daemon_pid))
        outs = [p.communicate(timeout=duration + warmup + 120)[0] for p in procs]
        own1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        for p, out in zip(procs, outs, strict=True):
            if p.returncode != 0:
                raise RuntimeError(f"h2load failed ({p.returncode}): {out.strip()[-500:]}")
        # Requests that started after the warm-up: (start s, status, latency ms).
        cut = start + warmup
        measured = []
        for log_file in logs:
            for line in log_file.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 3 and int(parts[0]) / 1e6 >= cut:
                    measured.append((parts[1], int(parts[2]) / 1000))
    lat = sorted(ms for status, ms in measured if status == "200")
    return {
        "tool": "h2load",
        "calls": len(lat),
        "http_failed": len(measured) - len(lat),
        "calls_per_s": len(lat) / duration,
        "rate": rate,
        "p50_ms": _pct(lat, 50),
        "p99_ms": _pct(lat, 99),
        "daemon_cpu_seconds": cpu[1] - cpu[0] if len(cpu) == 2 else None,
        "daemon_cores": (cpu[1] - cpu[0]) / duration if len(cpu) == 2 else None,
        "client_cpu_seconds": (own1.ru_utime + own1.ru_stime - own0.ru_utime - own0.ru_stime)
        * duration
        / (duration + warmup),
    }
