"""The one error root of the hsmsign client package.

Every error the client, the library and the ``hsmsign`` CLI raise on purpose is an
:class:`Error`: ``str()`` is one secret-free line and ``exit_code`` is what the CLI exits
with. Anything else reaching a user is a bug. The daemon has its own root (server side).
"""

from __future__ import annotations

from typing import ClassVar, Final

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_DOES_NOT_VERIFY: Final = 3


class Error(Exception):
    """Root of every error hsmsign raises on purpose; ``str()`` is one secret-free line."""

    exit_code: ClassVar[int] = EXIT_ERROR

    @property
    def message(self) -> str:
        return str(self)


class UsageError(Error):
    """The user asked for something impossible: a bad flag value, a missing file."""

    exit_code = EXIT_USAGE


class RemoteError(Error):
    """The daemon answered a call with a non-OK gRPC status."""

    def __init__(self, status_name: str, message: str) -> None:
        super().__init__(message)
        self.status_name = status_name
        self._message = message

    @property
    def message(self) -> str:
        return self._message

    def __str__(self) -> str:
        return f"{self.status_name}: {self._message}"


class VerificationError(Error):
    """A signature, checksum or bundle did not verify."""

    exit_code = EXIT_DOES_NOT_VERIFY
