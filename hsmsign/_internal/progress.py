"""The progress bar on stderr (one for every command), shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

#: Called with (bytes done, bytes total) as work progresses.
Progress = Callable[[int, int], None]

_MIB = 1 << 20
_WIDTH = 30
_MIN_INTERVAL_S = 0.1


def progress_bar(label: str, enabled: bool = True) -> Progress | None:
    """A (done, total) callback drawing a bar in MiB, or None when stderr is not a TTY."""
    if not enabled or not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < _MIN_INTERVAL_S:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * _WIDTH)
        sys.stderr.write(
            f"\r{label} [{bar:<{_WIDTH}}] {frac:6.1%} {done / _MIB:,.1f}/{total / _MIB:,.1f} MiB"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
