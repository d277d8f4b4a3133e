"""The daemon's one error root: ``ServerError``.

Every error the daemon raises on purpose is a ``ServerError``. Each class carries what it
becomes at the two boundaries, so nothing else decides it:

- ``code``: the gRPC status when it ends a call (applied only by ``server.api.pipeline``);
- ``exit_code``: the exit status when it ends ``hsmsignd`` (applied only by ``server.main``).

Call errors come one class per status; start-up errors (``StartupError`` and below) stop the
daemon before it serves. Messages are written for the caller: one line, what was wrong and what
is allowed, never a PIN, a session key, a digest the caller sent or any other secret.

This root is the daemon's own: it does not derive from the client's ``hsmsign.errors``.
"""

from __future__ import annotations

import grpc


class ServerError(Exception):
    """Root of the daemon's errors; one not refined below maps to INTERNAL and exit code 1."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    exit_code: int = 1


# -- call errors: one class per gRPC status -------------------------------------------------


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


class Unauthenticated(ServerError):
    """The call carries no usable identity: no credential, or one that does not verify."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Busy(ServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServerError):
    """The caller's deadline passed before or while the call ran (server.api.deadlines)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServerError):
    """The caller cancelled the call before or while it ran (server.api.deadlines)."""

    code = grpc.StatusCode.CANCELLED


class Unavailable(ServerError):
    """Try again later: the daemon is draining, or the token failed."""

    code = grpc.StatusCode.UNAVAILABLE


class TokenUnavailable(Unavailable):
    """The token failed or is out of reach."""


# -- start-up errors: carry the exit code ---------------------------------------------------


class StartupError(ServerError):
    """The daemon cannot start: module missing, token not found, login refused, port taken."""

    code = grpc.StatusCode.UNAVAILABLE
    exit_code = 1


class ConfigError(StartupError):
    """The configuration (or a command line) is wrong: names the file, the key and what is
    allowed. Exit code 2, like a usage error."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    exit_code = 2


#: The exit code of PinRefused: the supervisor never restarts a serving process that exits so.
EXIT_PIN_REFUSED = 77


class PinRefused(StartupError):
    """The token refused the user PIN: incorrect, locked or expired. Nothing ever tries that
    PIN again (a real HSM locks the user after a few tries): not the daemon, not its
    supervisor, and not systemd or Kubernetes, which are told by the exit code
    (``RestartPreventExitStatus``). Exit code 77 (sysexits' EX_NOPERM)."""

    exit_code = EXIT_PIN_REFUSED


#: A serving process exits with this when a token call stays hung past its limit and
#: token.stuck_exit_seconds (server/pkcs11/watchdog.py): restart it, the new process
#: initialises the module again (sysexits' EX_TEMPFAIL).
EXIT_TOKEN_HUNG = 75


class TokenNotFound(StartupError):
    """No token matches the config's label, serial or URI (also seen for a moment while
    another process rewrites a SoftHSM2 token's files)."""


def cannot_listen(address: str) -> StartupError:
    """The one message for a listen address the daemon cannot bind."""
    return StartupError(
        f"cannot listen on {address} (in use, or not a local address?); "
        "choose another with --listen HOST:PORT or server.listen"
    )
