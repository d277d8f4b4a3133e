"""The secrets search of a whole test run: no PIN, session key, digest or plaintext the tests
used may appear in any daemon log, audit file or captured command output of the run.

``tests/conftest.py`` runs ``check_run`` once, at the end of the session, over the run's base
temporary directory (every test's ``tmp_path``, where the harness writes daemon logs and
where audit trails go) and over what the harness captured in memory (``hsmsignd`` one-shot
commands, the client CLI through ``Daemon.hsmsign``). The secrets are every token PIN of the
run (each token directory's ``user.pin`` and ``so.pin``, found on disk, so tokens made by any
route count) and whatever the tests ``remember``. Each is searched as it is, in hex and in
base64. A finding names the file, the line and which secret, never the secret itself.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Files the search reads under the run's directory: logs and audit trails. Never the PIN
#: files themselves, nor the token's own storage.
SEARCHED = ("*.log", "audit-*.jsonl")
#: PIN files that dev-token.sh writes in a token directory.
PIN_FILES = ("user.pin", "so.pin")
#: Shorter values are not searched (they would match by chance).
MIN_SECRET_BYTES = 8

_remembered: dict[bytes, str] = {}
_captured: list[tuple[str, bytes]] = []
_watched: set[Path] = set()


def remember(secret: bytes | str, what: str) -> None:
    """Marks ``secret`` (a session key, a digest, a plaintext) as never to appear in a log;
    ``what`` names it in a finding."""
    data = secret.encode() if isinstance(secret, str) else secret
    if len(data) >= MIN_SECRET_BYTES:
        _remembered.setdefault(data, what)


def capture(where: str, output: str | bytes | None) -> None:
    """Keeps a command's captured output (stderr, stdout) for the search."""
    if output:
        _captured.append((where, output.encode() if isinstance(output, str) else output))


def forget_captured(where: str) -> None:
    """Drops the captured output named ``where`` (a test that planted a secret in it)."""
    _captured[:] = [(w, text) for w, text in _captured if w != where]


def watch(path: Path) -> None:
    """Adds a log file that may lie outside the run's directory to the search."""
    _watched.add(path)


def forms(secret: bytes) -> dict[bytes, str]:
    """How a secret could be written into a log (as it is, in hex, in base64), each with
    its name."""
    out = {
        base64.urlsafe_b64encode(secret).rstrip(b"="): "base64",
        base64.b64encode(secret).rstrip(b"="): "base64",
        secret.hex().upper().encode(): "hex",
        secret.hex().encode(): "hex",
        secret: "as it is",
    }
    return {f: name for f, name in out.items() if len(f) >= MIN_SECRET_BYTES}


def pins_under(root: Path) -> dict[bytes, str]:
    """Every token PIN under ``root``: the contents of each PIN file, named by its path."""
    found: dict[bytes, str] = {}
    for name in PIN_FILES:
        for p in root.rglob(name):
            try:
                if not p.is_file():  # a test's FIFO or dangling link: reading could block
                    continue
                pin = p.read_bytes().strip()
            except OSError:
                continue
            if len(pin) >= MIN_SECRET_BYTES:
                found.setdefault(pin, f"the PIN in {p}")
    return found


def searched_files(root: Path) -> list[Path]:
    files: set[Path] = set()
    for pattern in SEARCHED:
        files.update(p for p in root.rglob(pattern) if p.is_file() and not p.is_symlink())
    return sorted(files)


@dataclass(frozen=True)
class Leak:
    where: str  # file:line, or the captured command
    what: str  # which secret (never its value)
    form: str  # as it is, hex or base64

    def __str__(self) -> str:
        return f"{self.where}: {self.what} ({self.form})"


def find_leaks(texts: Iterable[tuple[str, bytes]], secrets: dict[bytes, str]) -> list[Leak]:
    """Every (where, text) in which a form of a secret appears; ``where`` gains the line."""
    needles = [
        (needle, what, form)
        for secret, what in secrets.items()
        for needle, form in forms(secret).items()
    ]
    leaks: list[Leak] = []
    for where, text in texts:
        for needle, what, form in needles:
            at = text.find(needle)
            if at >= 0:
                line = text.count(b"\n", 0, at) + 1
                leaks.append(Leak(f"{where}:{line}", what, form))
    return leaks


def _read(files: Iterable[Path]) -> Iterable[tuple[str, bytes]]:
    for p in files:
        try:
            yield str(p), p.read_bytes()
        except OSError:
            continue  # removed by its test (or unreadable on purpose): nothing left to leak


def check_run(root: Path) -> list[Leak]:
    """The search over everything the run left under ``root`` and captured in memory."""
    secrets = {**pins_under(root), **_remembered}
    files = sorted(set(searched_files(root)) | _watched)
    return find_leaks([*_read(files), *_captured], secrets)
