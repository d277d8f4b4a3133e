"""The one seam where tests interpose on python-pkcs11 (fault injection over the real token).

Inert unless ``install`` is called in this process, and nothing in ``server/`` calls it: only
the test launcher ``tests/harness/faulty_hsmsignd.py`` does, before it runs ``server.main``.
No environment variable or config setting reaches this module, so no production deployment
can switch it on by mistake.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_wrapper: Callable[[Any], Any] | None = None


def install(wrapper: Callable[[Any], Any]) -> None:
    """Makes ``module`` return ``wrapper(lib)``: called by the test launcher only."""
    global _wrapper
    _wrapper = wrapper


def module(lib: Any) -> Any:
    """The loaded python-pkcs11 ``lib`` the token uses (itself, unless a test installed a
    wrapper)."""
    return lib if _wrapper is None else _wrapper(lib)
