"""The dependency rules of the layout, read from the source (an AST scan of every import).

* the client package ``hsmsign/`` never imports python-pkcs11 or the daemon ``server/``;
* ``server/`` imports from ``hsmsign`` only the shared layer: :data:`SHARED_LAYER`, pure
  modules with no file, network or thread handling;
* the shared layer imports from ``hsmsign`` only itself (and the client error root that the
  Capgo format's errors derive from);
* ``bench/`` uses ``tests.harness``, never the pytest ``tests.conftest``;
* no module of ``hsmsign/`` or ``server/`` (generated stubs aside) is over about 600 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.harness import script

REPO: Final = Path(__file__).resolve().parents[2]

#: What server/ may import from hsmsign/ (a module or anything under it).
SHARED_LAYER: Final = frozenset(
    {
        "hsmsign.v1",
        "hsmsign.names",
        "hsmsign.keyformats",
        "hsmsign.tlsfiles",
        "hsmsign.capgo.format",
        "hsmsign.keycommands",
        "hsmsign.key_wrap",
        "hsmsign.auditlog",
    }
)
#: What the shared layer itself may import from hsmsign/ besides itself.
SHARED_LAYER_MAY_USE: Final = frozenset({"hsmsign.errors"})
#: Standard-library and third-party modules a shared-layer module must not import (I/O,
#: threads, the network): the daemon imports the shared layer and nothing more.
NOT_IN_SHARED_LAYER: Final = frozenset(
    {"grpc", "os", "queue", "shutil", "socket", "subprocess", "tempfile", "threading", "zipfile"}
)
MAX_LINES: Final = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "v1" not in p.relative_to(REPO).parts)


def imports_of(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in a file, relative ones resolved.

    ``from a import b`` yields ``a.b`` (b may be a module) as well as ``a``."""
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _under(module: str, roots: frozenset[str]) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def _top(module: str) -> str:
    return module.split(".")[0]


def _where(path: Path, line: int, module: str) -> str:
    return f"{path.relative_to(REPO)}:{line}: {module}"


def _is_module(name: str) -> bool:
    """Whether an imported dotted name is a module of this repository (not a name in one)."""
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def test_client_never_imports_pkcs11_or_the_daemon() -> None:
    bad = [
        _where(p, line, m)
        for p in _sources("hsmsign")
        for line, m in imports_of(p)
        if _top(m) in ("pkcs11", "server")
    ]
    assert bad == []


def test_server_imports_only_the_shared_layer_of_hsmsign() -> None:
    bad = [
        _where(p, line, m)
        for p in _sources("server")
        for line, m in imports_of(p)
        if _top(m) == "hsmsign" and m != "hsmsign" and _is_module(m) and not _under(m, SHARED_LAYER)
    ]
    assert bad == [], "server/ may import from hsmsign only " + ", ".join(sorted(SHARED_LAYER))


def _shared_files() -> list[Path]:
    files = []
    for name in sorted(SHARED_LAYER):
        base = REPO.joinpath(*name.split("."))
        if base.is_dir():
            files += [p for p in base.rglob("*.py") if not p.name.endswith("_grpc.py")]
        else:
            files.append(base.with_suffix(".py"))
    return files


@pytest.mark.parametrize("path", _shared_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_shared_layer_is_pure(path: Path) -> None:
    allowed = SHARED_LAYER | SHARED_LAYER_MAY_USE
    bad = [
        _where(path, line, m)
        for line, m in imports_of(path)
        if (_top(m) == "hsmsign" and m != "hsmsign" and _is_module(m) and not _under(m, allowed))
        or _top(m) in NOT_IN_SHARED_LAYER
    ]
    assert bad == []


def test_bench_does_not_import_the_test_conftest() -> None:
    bad = [
        _where(p, line, m)
        for p in _sources("bench")
        for line, m in imports_of(p)
        if m.split(".")[-1] == "conftest"
    ]
    assert bad == []


def test_no_module_is_over_the_size_limit() -> None:
    big = [
        f"{p.relative_to(REPO)}: {n} lines"
        for p in _sources("hsmsign") + _sources("server")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert big == []


def _import_in_a_fresh_interpreter(
    forbidden: str, modules: list[str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, script("import_modules.py"), forbidden, *modules],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_the_daemon_loads_no_capgo_file_handling() -> None:
    """Importing hsmsign.capgo.format (as the daemon does) loads no other part of hsmsign.capgo,
    and importing every client module loads neither python-pkcs11 nor server."""
    modules = sorted(_module_name(p) for p in _sources("hsmsign"))
    alone = _import_in_a_fresh_interpreter("hsmsign.capgo", ["hsmsign.capgo.format"])
    assert alone.returncode == 0, alone.stdout + alone.stderr
    everything = _import_in_a_fresh_interpreter("pkcs11,server", modules)
    assert everything.returncode == 0, everything.stdout + everything.stderr
    assert len(modules) > 10


def test_pyproject_keeps_pkcs11_in_the_server_extra() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not any("pkcs11" in d for d in project["dependencies"])
    assert any(d.startswith("python-pkcs11") for d in project["optional-dependencies"]["server"])
