"""Imports the named modules, then lists loaded modules whose top-level package is forbidden.
Usage: python import_modules.py FORBIDDEN,... MODULE...; prints 'COUNT [bad]', exits 1 if any."""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    forbidden = tuple(sys.argv[1].split(","))
    for name in sys.argv[2:]:
        importlib.import_module(name)
    bad = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
    print(len(sys.modules), bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
