"""The one exception root of hsmsign, client and daemon alike.

Every error hsmsign raises on purpose is an :class:`HsmsignError`; anything else reaching a
user is a bug. The CLI prints ``str(error)`` (one line, no traceback) and exits non-zero.
"""

from __future__ import annotations


class HsmsignError(Exception):
    """Root of every error hsmsign raises on purpose; ``str()`` is one secret-free line."""

    #: The gRPC status name this error travels as (client side: the one it arrived as).
    status_name: str = "INTERNAL"


class UsageError(HsmsignError):
    """The user asked for something impossible: a bad flag value, a missing file."""

    status_name = "INVALID_ARGUMENT"


class RemoteError(HsmsignError):
    """The daemon answered a call with a non-OK gRPC status."""

    def __init__(self, status_name: str, message: str) -> None:
        super().__init__(message)
        self.status_name = status_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.status_name}: {self.message}"


class VerificationError(HsmsignError):
    """A signature, checksum or bundle did not verify."""

    status_name = "FAILED_PRECONDITION"
