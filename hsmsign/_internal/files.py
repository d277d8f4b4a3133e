"""Output that appears only when everything succeeded; an existing file survives any failure.

The one implementation of atomic writes in the client: a temp file (or folder) beside the
target, renamed over it on success and removed on failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from hsmsign.errors import UsageError


def _directory_of(path: Path) -> Path:
    directory = path.parent if str(path.parent) else Path()
    if not directory.is_dir():
        raise UsageError(f"cannot write {path}: folder {directory} does not exist")
    return directory


@contextlib.contextmanager
def atomic_output(path: Path, mode: int = 0o644) -> Iterator[IO[bytes]]:
    """Yields a temp file next to ``path``; renames it over ``path`` only if the block ends
    without an exception. Whatever was at ``path`` stays untouched until then.

    Raises UsageError if the folder does not exist, OSError for other write failures.
    """
    fd, tmp = tempfile.mkstemp(dir=_directory_of(path), prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write data to path atomically. Raises UsageError, OSError."""
    with atomic_output(path, mode) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yields a staging folder next to ``path``, renamed to ``path`` only on success.

    ``path`` must not exist (folders cannot be replaced atomically). Raises UsageError if it
    exists or its parent does not, OSError for other failures.
    """
    if path.exists():
        raise UsageError(f"{path} already exists; give a new folder")
    staging = Path(
        tempfile.mkdtemp(dir=_directory_of(path), prefix=f".{path.name}.", suffix=".tmp")
    )
    try:
        yield staging
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
