"""hsmsignd with the fault-injection wrapper over its token (tests only).

``python -m tests.harness.faulty_hsmsignd PLAN HSMSIGND-ARGS...`` installs the wrapper of
``tests.harness.faults`` (driven by the plan file PLAN) and then runs ``server.main`` with the
rest of the arguments. With several serving processes, the supervisor starts each through
this launcher too (``server.supervisor.SERVING_COMMAND``), with the same plan: each process
fires the plan's faults by itself (a ``times`` count is per process), and every firing is
appended to the one ``.fired`` file.

With ``HSMSIGN_TEST_LOG_DELAY`` set (seconds), every log line reaches stderr that much later
than it was logged, as on a loaded host where the log's writer thread waits for the CPU. A
test that reads the log right after an answer, instead of waiting for the line
(``Daemon.wait_log``), fails every time instead of once in a while.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from pathlib import Path

from server import logsink, main, supervisor
from server.pkcs11 import intercept
from tests.harness import faults


def _delay_log_lines(seconds: float) -> None:
    """Every line reaches the sink ``seconds`` after it was logged, whatever the rate: a
    latency, not a slower writer (which would slow serving down to its pace instead)."""
    write = logsink.StderrSink.write
    due: collections.deque[tuple[float, logsink.StderrSink, bytes]] = collections.deque()
    ready = threading.Condition()

    def late(self: logsink.StderrSink, line: bytes) -> None:
        with ready:
            due.append((time.monotonic() + seconds, self, line))
            ready.notify()

    def deliver() -> None:
        while True:
            with ready:
                while not due:
                    ready.wait()
                at, sink, line = due.popleft()
            time.sleep(max(0.0, at - time.monotonic()))
            write(sink, line)

    threading.Thread(target=deliver, name="late-log", daemon=True).start()
    logsink.StderrSink.write = late  # type: ignore[method-assign]


def run(argv: list[str]) -> int:
    """Installs the wrapper for plan ``argv[0]``; runs hsmsignd with ``argv[1:]``."""
    intercept.install(faults.wrapper(Path(argv[0])))
    delay = os.environ.get("HSMSIGN_TEST_LOG_DELAY")
    if delay:
        _delay_log_lines(float(delay))
    supervisor.SERVING_COMMAND = [sys.executable, "-m", "tests.harness.faulty_hsmsignd", argv[0]]
    return main.main(argv[1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
