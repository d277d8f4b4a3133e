"""Domain errors of the daemon. Each carries the gRPC status it becomes in ``server.service``.

Messages are written for the caller: one line, what was wrong and what is allowed, never a
PIN, a session key, a digest the caller sent or any other secret.
"""

from __future__ import annotations

import grpc

from hsmsign.errors import HsmsignError


class ServerError(HsmsignError):
    """Root of the daemon's errors; unexpected ones map to INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    @property
    def status_name(self) -> str:  # type: ignore[override]
        return str(self.code.name)


class InvalidArgument(ServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class KeyNotFound(ServerError):
    code = grpc.StatusCode.NOT_FOUND


class KeyObjectGone(KeyNotFound):
    """The ring named a version whose private object another process has just destroyed."""


class FailedPrecondition(ServerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class MechanismUnsupported(FailedPrecondition):
    """The token does not implement a mechanism (or its parameters) that the call needs."""


class PermissionDenied(ServerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Busy(ServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServerError):
    """The caller's deadline passed before or while the call ran (server.deadlines)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServerError):
    """The caller cancelled the call before or while it ran (server.deadlines)."""

    code = grpc.StatusCode.CANCELLED


class TokenUnavailable(ServerError):
    code = grpc.StatusCode.UNAVAILABLE


class ConfigError(ServerError):
    """The configuration file is wrong: names the file, the key and what is allowed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class StartupError(ServerError):
    """The daemon cannot start: module missing, token not found, login refused, ..."""

    code = grpc.StatusCode.UNAVAILABLE


class TokenNotFound(StartupError):
    """No token matches the config's label, serial or URI (also seen for a moment while
    another process rewrites a SoftHSM2 token's files)."""
