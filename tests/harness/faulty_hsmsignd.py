"""hsmsignd with the fault-injection wrapper over its token (tests only).

``python -m tests.harness.faulty_hsmsignd PLAN HSMSIGND-ARGS...`` installs the wrapper of
``tests.harness.faults`` (driven by the plan file PLAN) and then runs ``server.main`` with the
rest of the arguments. With several serving processes, the supervisor starts each through
this launcher too (``server.supervisor.SERVING_COMMAND``), with the same plan: each process
fires the plan's faults by itself (a ``times`` count is per process), and every firing is
appended to the one ``.fired`` file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from server import main, supervisor
from server.pkcs11 import intercept
from tests.harness import faults


def run(argv: list[str]) -> int:
    """Installs the wrapper for plan ``argv[0]``; runs hsmsignd with ``argv[1:]``."""
    intercept.install(faults.wrapper(Path(argv[0])))
    supervisor.SERVING_COMMAND = [sys.executable, "-m", "tests.harness.faulty_hsmsignd", argv[0]]
    return main.main(argv[1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
