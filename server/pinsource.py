"""Reading the user PIN without leaving it where other users can read or swap it.

A PIN file (or systemd credential) is read only when nobody but the daemon's user could have
written it or pointed its name elsewhere: a regular file owned by that user (or, for a
credential, by root, who manages the credential directory), no access for group or others,
in a directory that group and others cannot write, through no symlink whose directory
others can write. It is opened without blocking, so a FIFO is refused instead of hanging the
start.

A PIN from an environment variable is taken out of the process's environment once read, the
initial environment block included (that is what /proc/PID/environ shows), so no process of
the daemon keeps it there. The supervisor hands it to the serving processes it starts through
a pipe (``PIN_FD_VARIABLE`` names the descriptor, never the PIN).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from server.errors import ConfigError

#: Set by the supervisor in a serving process's environment: the descriptor of a pipe that
#: holds the PIN the supervisor took from its own environment.
PIN_FD_VARIABLE = "HSMSIGND_PIN_FD"

#: A PIN file larger than this is not a PIN file.
MAX_PIN_BYTES = 4096

#: PINs taken from the environment by this process, by variable name: the variable is gone,
#: and a supervisor still needs the PIN for every serving process it (re)starts.
_taken: dict[str, str] = {}


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _directory_problem(directory: Path) -> str | None:
    """Why others could replace a file in ``directory``, or None."""
    st = directory.stat()
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"its directory {directory} is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):o}), so they could replace it"
        )
    if st.st_uid not in (0, os.geteuid()):
        return (
            f"its directory {directory} is owned by uid {st.st_uid}, who could make it "
            "writable and replace the file"
        )
    return None


def read_secret_file(path: Path, key: str, *, root_may_own: bool = False) -> str:
    """Returns the stripped text of a PIN file. ``key`` names the config key in messages;
    ``root_may_own`` admits a root-owned file (systemd credentials).

    Raises ConfigError (one line, never the file's contents) when the file is missing,
    unreadable, not a regular file, owned by another user, open to group or others, in a
    directory others can write, behind a symlink others could swap, empty or not UTF-8."""
    try:
        link = path.is_symlink()
        real = Path(os.path.realpath(path))
        problem = _directory_problem(Path(os.path.realpath(path.parent)))
        if problem is None and link:
            problem = _directory_problem(real.parent)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    shown = f"{path} (a symlink to {real})" if link else str(path)
    if problem is not None:
        raise ConfigError(
            f"{key}: {shown}: {problem}; keep the PIN in a directory only hsmsignd's user can write"
        )
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the name we
        # checked is the file we read.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{key}: cannot read {path}: {os.strerror(errno.EISDIR)}")
        raise ConfigError(f"{key}: {shown} is {_kind(st.st_mode)}; give a regular file")
    with os.fdopen(fd, "rb") as f:
        owners = {os.geteuid(), 0} if root_may_own else {os.geteuid()}
        if st.st_uid not in owners:
            raise ConfigError(
                f"{key}: {shown} is owned by uid {st.st_uid}, not by uid {os.geteuid()} that "
                f"hsmsignd runs as; run 'chown {os.geteuid()} {real}'"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"{key}: {shown} is writable by other users (mode {mode:o}); run 'chmod 600 {real}'"
            )
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{key}: {shown} is readable by other users (mode {mode:o}); run 'chmod 600 {real}'"
            )
        try:
            data = f.read(MAX_PIN_BYTES + 1)
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_PIN_BYTES:
        raise ConfigError(f"{key}: {shown} is larger than {MAX_PIN_BYTES} bytes: not a PIN")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        # Not the decoder's message: it quotes a byte of the secret.
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{key}: {path} is empty")
    return value


def _erase_initial_environment(name: str) -> None:
    """Overwrites ``name=value`` in the C environment block, then unsets it. unsetenv alone
    only drops the pointer: the bytes stay where /proc/PID/environ reads them."""
    libc = ctypes.CDLL(None)
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    prefix = name.encode() + b"="
    found: list[tuple[int, int]] = []
    i = 0
    while (address := environ[i]) is not None:
        entry = ctypes.string_at(address)
        if entry.startswith(prefix):
            found.append((address, len(entry)))
        i += 1
    os.environ.pop(name, None)  # os.unsetenv too, for every entry of that name
    for address, length in found:
        ctypes.memset(address, 0, length)


def _read_pipe(fd: int) -> str:
    chunks: list[bytes] = []
    try:
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def take_from_environment(name: str) -> str:
    """Returns the PIN from environment variable ``name`` (or from the supervisor's pipe in a
    serving process) and removes it from this process's environment.

    Raises ConfigError when it is not set or empty."""
    if name in _taken:
        return _taken[name]
    handed = os.environ.get(PIN_FD_VARIABLE)
    if handed is not None:
        _erase_initial_environment(PIN_FD_VARIABLE)
        try:
            value = _read_pipe(int(handed))
        except (ValueError, OSError, UnicodeDecodeError):
            raise ConfigError(
                f"{PIN_FD_VARIABLE} is internal to hsmsignd (a pipe from its supervisor)"
            ) from None
    else:
        value = os.environ.get(name, "")
        _erase_initial_environment(name)
    if not value:
        raise ConfigError(f"the PIN environment variable {name} is not set or empty")
    _taken[name] = value
    return value


@contextlib.contextmanager
def handed_to_child(env_name: str | None) -> Iterator[tuple[dict[str, str], tuple[int, ...]]]:
    """For a serving process about to start: the environment entries and descriptors that
    pass it the PIN taken from ``env_name`` (nothing when the PIN comes from a file). Close
    happens on exit, after the child has its copy of the descriptor."""
    if env_name is None:
        yield {}, ()
        return
    pin = take_from_environment(env_name).encode()
    read_end, write_end = os.pipe()
    try:
        try:
            os.write(write_end, pin)  # a PIN is far below a pipe's buffer: never blocks
        finally:
            os.close(write_end)  # the child reads to end of file
        yield {PIN_FD_VARIABLE: str(read_end)}, (read_end,)
    finally:
        os.close(read_end)
