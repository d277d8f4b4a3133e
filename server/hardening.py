"""Process hardening every hsmsignd process applies to itself before it reads a secret.

With SoftHSM2 (and any PKCS#11 module that works in-process) the token's objects live in the
daemon's memory: a core dump held the private exponent, the primes, session keys and the
PIN. So no process of the daemon may dump core, whatever limit its parent left it, and none
is dumpable: the kernel then writes no core even if someone raises the limit again from
outside (prlimit), and other processes of the same user cannot ptrace it or read its memory
through /proc/PID/mem. Both settings are per process and reset by exec, so the supervisor
and each serving process apply them in ``server.main.main``.
"""

from __future__ import annotations

import ctypes
import os
import resource

from server.errors import StartupError

#: <linux/prctl.h>
PR_SET_DUMPABLE = 4


def forbid_core_dumps() -> None:
    """Sets RLIMIT_CORE to 0 (soft and hard) and marks the process not dumpable.

    Raises StartupError if the kernel refuses (a daemon that could dump its keys must not
    start)."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as e:
        raise StartupError(f"cannot switch off core dumps (RLIMIT_CORE): {e}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise StartupError(f"cannot mark the process not dumpable: {os.strerror(err)}")
