"""The daemon's dependency rules (docs/adr/0004-dependency-rules.md), read from the source.

- server/pkcs11/ is the only code that imports python-pkcs11;
- the key ring's pure modules touch no token.

That server/ imports only hsmsign's shared layer is tests/unit/test_layering.py's.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER = REPO / "server"


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "hsmsign":  # from hsmsign import keyformats
                yield from (f"hsmsign.{a.name}" for a in node.names)
            else:
                yield node.module


def _server_files() -> list[Path]:
    files = sorted(SERVER.rglob("*.py"))
    assert len(files) > 20
    return files


def _is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_only_server_pkcs11_imports_python_pkcs11() -> None:
    offenders = [
        (str(p.relative_to(REPO)), m)
        for p in _server_files()
        for m in _imports(p)
        if _is_under(m, "pkcs11") and p.parent != SERVER / "pkcs11"
    ]
    assert offenders == []


def test_server_pkcs11_objects_is_a_plain_value() -> None:
    # The key ring's pure join builds on it; it must not pull python-pkcs11 in.
    assert not any(_is_under(m, "pkcs11") for m in _imports(SERVER / "pkcs11" / "objects.py"))


def test_the_pure_keyring_modules_touch_no_token() -> None:
    for name in ("model.py", "join.py", "state.py"):
        imports = set(_imports(SERVER / "keyring" / name))
        assert not any(_is_under(m, "pkcs11") for m in imports), name
        assert not any(
            _is_under(m, s)
            for m in imports
            for s in ("server.pkcs11.token", "server.pkcs11.session", "server.keyring.ring")
        ), name
