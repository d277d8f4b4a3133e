"""Part 3c's sliced measurement: the token probe and the daemons' batch load take turns.

The token limit on this shared 2-core host moves by ±15% within a minute (five 3 s probes 13 s
apart read 2,606-3,554 signatures/s), so a 12 s daemon row between two probes cannot be read
to a few percent. Here the token probe (``bench.inprocess token-slices``) and one batch load
driver per daemon (``python -m bench.slices load``) are started once and stay up, logged in
and connected, and do work only in the slice they are told to run: probe, daemon A, probe,
daemon B, probe, ... in slices of 1-2 s. Each daemon slice is divided by the mean of the
probes right before and right after it, which ran within a few seconds of it.

A batch call that straddles a window's edge counts by the share of its duration inside the
window (``counted``), so neither end of a slice biases its rate; the calls in flight when a
window closes finish before the next slice starts, so nothing overlaps the probe.

    python -m bench.slices load --target HOST:PORT --key KEY [--callers 4] [--batch 256]

runs one load driver: one connection per caller, closed loop, SignDigests of ``--batch``
digests; it reads ``run SECONDS`` lines on stdin and answers each with one JSON line, and
exits at ``quit`` or when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Span:
    """One call (or one signature): when it started and ended, and how many signatures it
    made."""

    start: float
    end: float
    items: int


def counted(spans: Iterable[Span], lo: float, hi: float) -> float:
    """Signatures made inside the window [lo, hi]: each span counts its items times the share
    of its duration that lies inside the window (its work taken as spread evenly over it). A
    span of no duration counts whole when it lies inside the window."""
    total = 0.0
    for s in spans:
        if s.end <= s.start:
            total += s.items if lo <= s.start <= hi else 0
            continue
        overlap = min(s.end, hi) - max(s.start, lo)
        if overlap > 0:
            total += s.items * overlap / (s.end - s.start)
    return total


def slice_ratios(probes: Sequence[float], rates: Sequence[float]) -> list[float]:
    """Each daemon slice's rate over the mean of the token probes right before and right
    after it: ``probes[i]`` ran before ``rates[i]`` and ``probes[i + 1]`` after it."""
    if len(probes) != len(rates) + 1:
        raise ValueError(f"{len(rates)} slices need {len(rates) + 1} probes, not {len(probes)}")
    return [r / ((probes[i] + probes[i + 1]) / 2) for i, r in enumerate(rates)]


def quartiles(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(first quartile, median, third quartile); None for no values. The quartiles are
    interpolated between the ordered values (statistics' "inclusive" method)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


# ---- the load driver (a child process) --------------------------------------------------


async def _slice(
    fns: Sequence[Any], request: Any, items: int, seconds: float, daemon_pid: int | None = None
) -> dict[str, Any]:
    """One slice: every caller sends its next call as soon as its last one returns, from now
    until ``seconds`` have passed; the calls in flight then finish before this returns. With
    ``daemon_pid``, the daemon's CPU is read as the window opens and as it closes."""
    import grpc

    from bench.setup import tree_cpu_seconds

    spans: list[Span] = []
    errors: dict[str, int] = {}
    cpu0 = time.process_time()
    daemon0 = tree_cpu_seconds(daemon_pid) if daemon_pid is not None else 0.0
    start = time.perf_counter()
    stop = start + seconds
    daemon_window: list[float] = []

    async def meter() -> None:
        if daemon_pid is not None:
            await asyncio.sleep(max(0.0, stop - time.perf_counter()))
            daemon_window.append(tree_cpu_seconds(daemon_pid) - daemon0)

    # Calls that started inside the window and have not ended. Until the last of them ends,
    # every caller keeps calling (calls that start after the window count nothing), so the
    # calls straddling the window's end run at the same concurrency as inside it; else the
    # last ones would finish faster alone and their pro rata share would count too much.
    straddling = [0]

    async def caller(fn: Any) -> None:
        while (t0 := time.perf_counter()) < stop or straddling[0]:
            inside = t0 < stop
            straddling[0] += inside
            try:
                await fn(request, timeout=30)
            except grpc.aio.AioRpcError as e:
                errors[e.code().name] = errors.get(e.code().name, 0) + 1
                return  # a failed slice measures nothing; do not spin on the error
            finally:
                straddling[0] -= inside
            spans.append(Span(t0, time.perf_counter(), items))

    await asyncio.gather(meter(), *(caller(fn) for fn in fns))
    wall = time.perf_counter() - start
    done = counted(spans, start, stop)
    lat = sorted(s.end - s.start for s in spans if s.start < stop)
    return {
        "signatures": done,
        "seconds": seconds,
        "ops_per_s": done / seconds,
        "calls": sum(1 for s in spans if s.start < stop),
        "after": sum(1 for s in spans if s.start >= stop),
        "signed": sum(s.items for s in spans),
        "wall_seconds": wall,
        "cpu_seconds": time.process_time() - cpu0,
        "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
        "max_ms": lat[-1] * 1000 if lat else None,
        "errors": errors,
        "daemon_window_cpu_seconds": daemon_window[0] if daemon_window else None,
    }


def slice_seconds(line: str) -> float | None:
    """What a kept-up child is told on one line: the seconds of a ``run SECONDS`` slice, or
    None to stop (``quit``, an empty line). Raises ValueError for anything else."""
    words = line.split()
    if not words or words[0] == "quit":
        return None
    if words[0] != "run" or len(words) != 2:
        raise ValueError(f"unknown command {line.strip()!r}")
    return float(words[1])


def answer_slices(lines: Iterable[str], run: Callable[[float], dict[str, Any]]) -> None:
    """Answers each ``run SECONDS`` line of ``lines`` with ``run(seconds)`` as one JSON line,
    and a bad line with an error line, until told to stop."""
    for line in lines:
        try:
            seconds = slice_seconds(line)
        except ValueError as e:
            print(json.dumps({"error": str(e)}), flush=True)
            continue
        if seconds is None:
            return
        print(json.dumps(run(seconds)), flush=True)


async def _drive(target: str, key: str, callers: int, batch: int, daemon_pid: int | None) -> None:

    from bench.load import LoadSpec, _request
    from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc

    _method, request = _request(LoadSpec(target, "batch", key, callers, batch=batch))
    channels = await _balanced_channels(target, callers, daemon_pid)
    try:
        fns = [pb_grpc.SignerStub(ch).SignDigests for ch in channels]
        # Warm-up: each connection's first call (the daemon's first look at the key, and
        # HTTP/2 windows), not counted.
        await asyncio.gather(*(fn(request, timeout=60) for fn in fns))
        print(json.dumps({"ready": True, "callers": callers, "batch": batch}), flush=True)
        loop = asyncio.get_running_loop()

        def run(seconds: float) -> dict[str, Any]:
            # On a thread of the loop's executor: the slice itself runs on the loop.
            slice_ = _slice(fns, request, batch, seconds, daemon_pid)
            return asyncio.run_coroutine_threadsafe(slice_, loop).result()

        await loop.run_in_executor(None, answer_slices, sys.stdin, run)
    finally:
        for ch in channels:
            await ch.close()


#: Times the driver opens its connections again at most, for a balanced split.
BALANCE_ATTEMPTS = 40


def balanced(split: Sequence[int], connections: int, processes: int) -> bool:
    """Whether ``connections`` spread as ``split`` (per serving process) use every serving
    process they can, as evenly as they can."""
    return (
        sum(split) == connections
        and len(split) == min(connections, processes)
        and max(split) - min(split) <= 1
    )


async def _balanced_channels(target: str, callers: int, daemon_pid: int | None) -> list[Any]:
    """One connection per caller, as separate build agents would open (a local subchannel
    pool per channel, or grpcio would share one connection between them), opened again until
    they are spread evenly over the daemon's serving processes (when its pid is known). The
    kernel puts each connection on a process by a hash of its ports: 4 connections leave one
    of 2 processes idle 1 time in 8, and 3 on one half the time, which would measure that
    luck, not the daemon; a fleet of build agents has many connections."""
    import grpc

    from bench.setup import process_tree

    channels: list[Any] = []
    for _ in range(BALANCE_ATTEMPTS):
        channels = [
            grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(callers)
        ]
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), 30)
        if daemon_pid is None:
            return channels
        processes = max(1, len(process_tree(daemon_pid)) - 1)
        if balanced(connection_split(os.getpid(), daemon_pid), callers, processes):
            return channels
        for ch in channels:
            await ch.close()
    return channels  # the last try, unbalanced: the bench prints the split it got


# ---- the bench's side: children kept up, and the alternation ----------------------------


class Kept:
    """A child process kept up for the slices: it prints one JSON line when ready, then
    answers each ``run SECONDS`` line with one JSON line. Closing its stdin stops it."""

    def __init__(self, args: Sequence[str], what: str, timeout: float = 90.0) -> None:
        self.what = what
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()
        try:
            self.ready = self._answer(timeout)
        except BaseException:
            self.stop()
            raise

    def _pump(self, stream: IO[str], answers: bool) -> None:
        for line in stream:
            if answers:
                self._lines.put(line)
            else:
                self._stderr.append(line)
                del self._stderr[:-20]
        if answers:
            self._lines.put(None)

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.what}: no answer within {timeout:.0f} s") from None
        if line is None:
            self.proc.wait(10)
            raise RuntimeError(
                f"{self.what} exited ({self.proc.returncode}): {''.join(self._stderr)[-2000:]}"
            )
        out: dict[str, Any] = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"{self.what}: {out['error']}")
        return out

    def send(self, seconds: float) -> None:
        """Starts a slice of ``seconds``; ``answer`` waits for its result."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {seconds}\n")
        self.proc.stdin.flush()

    def answer(self, seconds: float) -> dict[str, Any]:
        return self._answer(seconds + 90.0)

    def run(self, seconds: float) -> dict[str, Any]:
        self.send(seconds)
        return self.answer(seconds)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)


def _tcp_sockets() -> dict[int, tuple[int, int]]:
    """Socket inode -> (local port, remote port) of every TCP socket (the daemon listens on
    a dual-stack socket, so its side of an IPv4 connection is in tcp6)."""
    out: dict[int, tuple[int, int]] = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            local, remote, inode = f[1], f[2], int(f[9])
            out[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16))
    return out


def _socket_inodes(pid: int) -> set[int]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def connection_split(client_pid: int, daemon_pid: int) -> list[int]:
    """How many of the client's TCP connections each of the daemon's processes serves
    (sorted, largest first): the kernel spreads connections, not calls, over the serving
    processes, and the kept-up drivers keep theirs for the whole part."""
    from bench.setup import process_tree

    tcp = _tcp_sockets()
    ours = {tcp[i] for i in _socket_inodes(client_pid) if i in tcp}
    split = []
    for pid in process_tree(daemon_pid):
        try:
            theirs = {tcp[i] for i in _socket_inodes(pid) if i in tcp}
        except OSError:
            continue
        n = sum(1 for local, remote in ours if (remote, local) in theirs)
        if n:
            split.append(n)
    return sorted(split, reverse=True)


@dataclass(frozen=True)
class Target:
    """One daemon the slices load: its name in the results, its address and its pid."""

    name: str
    address: str
    pid: int


def alternate(
    probe: Kept,
    drivers: dict[str, Kept],
    targets: Sequence[Target],
    pairs: int,
    slice_seconds: float,
    probe_seconds: float,
) -> dict[str, Any]:
    """probe, targets[0], probe, targets[1], probe, ... ``pairs`` times over the targets.
    Returns the probes in order and, per target, its slices (each with the indices of the
    probes around it, the daemon's CPU over the window and its drain, and the driver's
    answer, which has the daemon's CPU inside the window when the driver was given its
    pid)."""
    from bench.setup import tree_cpu_seconds

    probes: list[dict[str, Any]] = [probe.run(probe_seconds)]
    slices: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for k in range(pairs):
        for t in targets:
            cpu0 = tree_cpu_seconds(t.pid)
            r = drivers[t.name].run(slice_seconds)
            r["daemon_cpu_seconds"] = tree_cpu_seconds(t.pid) - cpu0
            r["pair"] = k
            r["probe_before"] = len(probes) - 1
            probes.append(probe.run(probe_seconds))
            r["probe_after"] = len(probes) - 1
            slices[t.name].append(r)
        _print_pair(k, probes, {t.name: slices[t.name][-1] for t in targets})
    return {"probes": probes, "slices": slices}


def _print_pair(k: int, probes: list[dict[str, Any]], last: dict[str, dict[str, Any]]) -> None:
    """One line per pair: each daemon slice's rate and its ratio to the probes around it."""
    parts = []
    for name, r in last.items():
        before, after = probes[r["probe_before"]], probes[r["probe_after"]]
        ref = (before["ops_per_s"] + after["ops_per_s"]) / 2
        failed = f" failed {r['errors']}" if r["errors"] else ""
        parts.append(
            f"probe {before['ops_per_s']:.0f} | {name} {r['ops_per_s']:.0f} "
            f"({r['ops_per_s'] / ref:.2f}){failed}"
        )
    print(
        f"    pair {k + 1}: " + " | ".join(parts) + f" | probe {probes[-1]['ops_per_s']:.0f}",
        flush=True,
    )


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.slices", description=__doc__)
    p.add_argument("what", choices=["load"])
    p.add_argument("--target", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--callers", type=int, default=4)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument(
        "--daemon-pid", type=int, default=None, help="read its CPU as each window opens and closes"
    )
    a = p.parse_args()
    asyncio.run(_drive(a.target, a.key, a.callers, a.batch, a.daemon_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
