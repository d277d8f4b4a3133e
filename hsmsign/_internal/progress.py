"""A progress bar on stderr, shown only when stderr is a terminal."""

from __future__ import annotations

import sys
import time

from hsmsign.capgo import Progress


def progress_bar(label: str) -> Progress | None:
    """Returns a (done, total) callback drawing a bar, or None when stderr is not a TTY."""
    if not sys.stderr.isatty():
        return None
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.1:
            return
        last[0] = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        sys.stderr.write(
            f"\r{label} [{bar:<30}] {frac:6.1%} {done / 1e6:,.1f}/{total / 1e6:,.1f} MB"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
