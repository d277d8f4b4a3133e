"""Runs the daemon's process hardening, then prints what the kernel says of this process:
its core-size limit and whether it is dumpable (PR_GET_DUMPABLE), as JSON."""

from __future__ import annotations

import ctypes
import json
import resource

from server import hardening

PR_GET_DUMPABLE = 3


def main() -> None:
    hardening.forbid_core_dumps()
    libc = ctypes.CDLL(None, use_errno=True)
    print(
        json.dumps(
            {
                "core_limit": list(resource.getrlimit(resource.RLIMIT_CORE)),
                "dumpable": libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0),
            }
        )
    )


if __name__ == "__main__":
    main()
