"""Prometheus metrics: what every serving process did, summed, on one HTTP endpoint.

With ``server.metrics_listen`` set, the daemon's first process (the supervisor, or the one
serving process) serves ``/metrics`` there, in Prometheus' text format, and every serving
process counts into files of a private directory (prometheus-client's multiprocess mode:
counters in memory-mapped files, summed at scrape time). So a scrape sees the whole daemon,
whichever process answered a call, and counts survive a serving process being replaced.
Without ``metrics_listen`` nothing is counted and ``call`` and ``signed`` return at once.

What is counted (no key material, digests or identities; label values are method and status
names only):

``hsmsign_calls_total{method, status}``
    every call hsmsign's pipeline ran, as its access-log line says, including those it
    refused (RESOURCE_EXHAUSTED: shed by the admission queue or a limit; DEADLINE_EXCEEDED,
    CANCELLED: the caller had gone). Calls gRPC refuses itself over
    ``server.max_concurrent_calls`` never reach the pipeline and are not counted.
``hsmsign_call_duration_seconds{method}``
    their durations, as the access log's ``ms``.
``hsmsign_signatures_total``
    signatures made (a batch counts each digest).

prometheus-client reads ``PROMETHEUS_MULTIPROC_DIR`` when it is first imported, so
``serve_endpoint`` sets it before any import, and serving processes inherit it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from typing import Any

from server.errors import StartupError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Bucket bounds of the call durations (seconds): a signature takes about a millisecond on a
#: software token and tens of milliseconds on a network HSM; a batch of 10,000 seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Recorder:
    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.calls = Counter(
            "hsmsign_calls_total", "Calls run by hsmsign's pipeline", ["method", "status"]
        )
        self.duration = Histogram(
            "hsmsign_call_duration_seconds",
            "Duration of the calls run by hsmsign's pipeline",
            ["method"],
            buckets=BUCKETS,
        )
        self.signatures = Counter("hsmsign_signatures_total", "Signatures made")
        self.unread = Counter(
            "hsmsign_calls_gone_unread_total",
            "Calls whose caller went (deadline passed or cancelled) before their request was "
            "read: never run, and not in the access log or the audit trail",
            ["method"],
        )
        self._children: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def call(self, method: str, status: str, seconds: float) -> None:
        key = (method, status)
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children[key] = (
                    self.calls.labels(method, status),
                    self.duration.labels(method),
                )
        child[0].inc()
        child[1].observe(seconds)


_recorder: _Recorder | None = None
#: The endpoint's "HOST:PORT" once ``serve_endpoint`` has bound it (the ready file names it).
served_address: str | None = None
_directory: str | None = None


def call(method: str, status: str, seconds: float) -> None:
    """Counts one call (the pipeline's ``access_log`` stage)."""
    if _recorder is not None:
        _recorder.call(method, status, seconds)


def signed(n: int) -> None:
    """Counts ``n`` signatures made."""
    if _recorder is not None:
        _recorder.signatures.inc(n)


def gone_unread(method: str) -> None:
    """Counts a call whose caller went before its request was read (``server.api.dispatch``)."""
    if _recorder is not None:
        _recorder.unread.labels(method).inc()


def serve_endpoint(listen: str) -> str:
    """Makes the private directory the serving processes count into, and serves
    ``/metrics`` on ``listen`` ("HOST:PORT", port 0 picks one); returns the bound address.
    Call once, in the daemon's first process, before serving processes start.

    Raises StartupError when the port cannot be bound."""
    global served_address, _directory
    _directory = tempfile.mkdtemp(prefix="hsmsignd-metrics-")  # mode 0700
    os.environ[MULTIPROC_ENV] = _directory
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=_directory)  # type: ignore[no-untyped-call]
    host, _, port = listen.rpartition(":")
    try:
        httpd, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as e:
        close()
        raise StartupError(
            f"cannot serve metrics on {listen} (server.metrics_listen): {e.strerror or e}"
        ) from None
    served_address = f"{host}:{httpd.server_port}"  # config.py: the host is never empty
    return served_address


def start_counting() -> None:
    """Counts from now on in this process, into ``PROMETHEUS_MULTIPROC_DIR`` (set by
    ``serve_endpoint`` here, or inherited from the first process by a serving process). Call
    only when ``server.metrics_listen`` is set."""
    global _recorder
    if _recorder is None and os.environ.get(MULTIPROC_ENV):
        _recorder = _Recorder()


def close() -> None:
    """Removes the counting directory (the daemon is stopping)."""
    if _directory is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(_directory)
