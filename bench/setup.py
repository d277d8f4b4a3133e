"""The bench's own SoftHSM2 token, keys and daemon, built with the test suite's helpers."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness import (
    PROXY_MODULE,
    Daemon,
    TokenDir,
    hsmsignd,
    make_token,
    start_daemon,
)

#: Key names the bench creates: one per modulus size.
KEY_2048 = "bench2048"
KEY_3072 = "bench3072"


@dataclass(frozen=True)
class DaemonSettings:
    """The knobs the bench varies; everything else is the shipped default."""

    sessions: int | None = None
    workers: int | None = None
    log_level: str = "INFO"
    processes: int | None = None
    #: With the audit trail ([audit] path beside the config): every call fsync'd on record.
    audit: bool = False

    def describe(self) -> str:
        def d(v: int | None) -> str:
            return "default" if v is None else str(v)

        return (
            f"processes={d(self.processes)} sessions={d(self.sessions)} "
            f"workers={d(self.workers)} log={self.log_level}"
        ) + (" audit=on" if self.audit else "")


def write_bench_config(path: Path, token: TokenDir, s: DaemonSettings) -> Path:
    workers = f"workers = {s.workers}\n" if s.workers is not None else ""
    workers += f"processes = {s.processes}\n" if s.processes is not None else ""
    sessions = f"sessions = {s.sessions}\n" if s.sessions is not None else ""
    path.write_text(
        f"""log_level = "{s.log_level}"
[token]
module = "{PROXY_MODULE}"
label = "{token.label}"
pin_file = "{token.pin_file}"
{sessions}[token.environment]
SOFTHSM2_CONF = "{token.conf}"
[server]
listen = "127.0.0.1:0"
max_concurrent_calls = 1024
{workers}
# The caller on this host may do everything (as in hsm_config/dev.toml).
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local"]
keys = ["*"]
operations = ["*"]
"""
    )
    if s.audit:  # relative to the config file's directory
        with path.open("a") as f:
            f.write(f'\n[audit]\npath = "{path.stem}-audit"\n')
    return path


def make_bench_token(root: Path) -> TokenDir:
    """A fresh token under ``root`` with an RSA-2048 and an RSA-3072 signing key."""
    token = make_token(root / "token", "hsmsign-bench")
    config = write_bench_config(root / "setup.toml", token, DaemonSettings(processes=1))
    hsmsignd(config, "keys", "create", KEY_2048)
    hsmsignd(config, "keys", "create", KEY_3072, "--algorithm", "rsa-3072")
    return token


def launch(
    root: Path, token: TokenDir, s: DaemonSettings, name: str, code: Path | None = None
) -> Daemon:
    """Starts hsmsignd; ``code`` runs another copy of the server (e.g. the last commit's,
    from ``git archive``) to compare a change side by side."""
    config = write_bench_config(root / f"{name}.toml", token, s)
    env = {"PYTHONPATH": str(code)} if code else None
    return start_daemon(config, root / name, env=env)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc, so it works for any child)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children: a daemon's supervisor and its serving processes."""
    pids = [pid]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            pids.append(int(stat.parent.name))
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a daemon: its supervisor plus every serving process alive now."""
    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):  # exited between the listing and the read
            total += cpu_seconds(p)
    return total


def tree_context_switches(pid: int) -> int:
    """Voluntary context switches of every thread of a daemon's processes alive now: how
    often its threads went to sleep waiting for something (a lock, a queue, a wake-up). A
    count of hand-offs that, unlike CPU time, a busy host hardly moves."""
    total = 0
    for p in process_tree(pid):
        for status in Path(f"/proc/{p}/task").glob("*/status"):
            with contextlib.suppress(OSError):  # the thread ended meanwhile
                for line in status.read_text().splitlines():
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
    return total


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over the daemon's processes (shared pages counted in each)."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += rss_kib(p)
    return total


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_idle(seconds: float = 0.3) -> None:
    """A short pause between configurations so one's tail does not overlap the next."""
    time.sleep(seconds)
