"""Imports the named modules, then lists loaded modules under a forbidden prefix.

Usage: python import_modules.py FORBIDDEN,... MODULE...
A forbidden prefix covers the module of that name and everything below it; the named modules
and their parent packages are allowed. Prints 'COUNT [bad]' and exits 1 if any is bad.
"""

from __future__ import annotations

import importlib
import sys


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def main() -> None:
    forbidden = tuple(sys.argv[1].split(","))
    named = sys.argv[2:]
    for name in named:
        importlib.import_module(name)
    allowed = {".".join(n.split(".")[: i + 1]) for n in named for i in range(n.count(".") + 1)}
    bad = sorted(
        m for m in sys.modules if m not in allowed and any(_under(m, f) for f in forbidden)
    )
    print(len(sys.modules), bad)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
