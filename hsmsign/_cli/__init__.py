"""The ``hsmsign`` command: dispatch, and the one error boundary. Each command group lives
in its own module of this package.

Exit codes: 0 success, 1 an error (one line on stderr, never a traceback), 2 bad usage,
3 a signature or bundle that does not verify, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

# gRPC's C core writes its own log lines to stderr (a failed TLS handshake, for one); the CLI
# reports every failure in one line of its own, so gRPC stays quiet unless the user asks
# (GRPC_VERBOSITY=ERROR). Set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from hsmsign import keycommands, names
from hsmsign._cli import audit, basic, bundle, keys, unwrap
from hsmsign._internal import plaintext
from hsmsign.client import (
    DEFAULT_SERVER,
    DEFAULT_TIMEOUT,
    Client,
    TlsOptions,
    check_token,
    read_token_file,
)
from hsmsign.connection import DEFAULT_CONNECTIONS, parse_connections
from hsmsign.errors import (
    EXIT_ERROR,
    EXIT_USAGE,
    Error,
    UsageError,
    VerificationError,
)

#: Modules that add command groups: each has ``register(subparsers)``; the parser's
#: ``func`` default is called with (args, connect).
COMMAND_MODULES = [basic, bundle, keys, unwrap, audit]
EXIT_INTERRUPTED = 130

Connect = Callable[[], Client]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsmsign",
        description="Sign and seal with keys held in an HSM, through hsmsignd.",
        epilog="Key references: NAME (primary version), NAME@VERSION, sha256:FINGERPRINT, "
        "keyid:CAPGO_KEY_ID. Environment: HSMSIGN_SERVER, HSMSIGN_TIMEOUT, HSMSIGN_CONNECTIONS, "
        "HSMSIGN_TLS_CA, "
        "HSMSIGN_TLS_CERT, HSMSIGN_TLS_KEY, HSMSIGN_TLS_SERVER_NAME, HSMSIGN_OIDC_TOKEN_FILE, "
        "HSMSIGN_OIDC_TOKEN.",
    )
    env = os.environ.get
    p.add_argument(
        "--server",
        default=env("HSMSIGN_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"hsmsignd address (default {DEFAULT_SERVER}); several replicas: A:PORT,B:PORT "
        "or dns:///NAME:PORT (calls are spread over them and retried on another)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=env("HSMSIGN_TIMEOUT", str(DEFAULT_TIMEOUT)),
        metavar="SECONDS",
        help=f"deadline of each call, retries included (default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--connections",
        type=_connections,
        default=env("HSMSIGN_CONNECTIONS"),
        metavar="N",
        help=f"connections to open to each address; calls take them in turn, so that they "
        f"reach every serving process of a daemon (default {DEFAULT_CONNECTIONS})",
    )
    p.add_argument(
        "--tls-ca",
        type=Path,
        default=env("HSMSIGN_TLS_CA"),
        metavar="PEM",
        help="CA certificate that signed the daemon's certificate (enables TLS)",
    )
    p.add_argument(
        "--tls-cert",
        type=Path,
        default=env("HSMSIGN_TLS_CERT"),
        metavar="PEM",
        help="client certificate for mutual TLS",
    )
    p.add_argument(
        "--tls-key",
        type=Path,
        default=env("HSMSIGN_TLS_KEY"),
        metavar="PEM",
        help="client private key for mutual TLS",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext (no TLS) to an address off this machine",
    )
    p.add_argument(
        "--tls-server-name",
        default=env("HSMSIGN_TLS_SERVER_NAME"),
        metavar="NAME",
        help="expected name in the daemon's certificate, if not the host",
    )
    # No default from the environment here: the token's source is resolved in _oidc_token,
    # so that neither the token nor its file shows in --help.
    p.add_argument(
        "--oidc-token-file",
        type=Path,
        metavar="PATH",
        help="send the CI job's OIDC ID token in PATH (read on each run) as the caller's "
        "identity; else HSMSIGN_OIDC_TOKEN_FILE, else the token itself in HSMSIGN_OIDC_TOKEN. "
        "Sent only over TLS or to this machine",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 10**9:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _connections(text: str) -> int:
    try:
        return parse_connections(text, "")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e).lstrip()) from None


def _oidc_token(args: argparse.Namespace) -> str | None:
    """The OIDC ID token to send, if any: --oidc-token-file, else HSMSIGN_OIDC_TOKEN_FILE,
    else HSMSIGN_OIDC_TOKEN. Raises UsageError (never quoting the token) for a bad one."""
    path = args.oidc_token_file or os.environ.get("HSMSIGN_OIDC_TOKEN_FILE")
    if path:
        return read_token_file(Path(path))
    token = os.environ.get("HSMSIGN_OIDC_TOKEN")
    if token is None:
        return None
    return check_token(token.strip(), "HSMSIGN_OIDC_TOKEN")


def _connector(args: argparse.Namespace) -> Connect:
    def connect() -> Client:
        tls = None
        oidc_token = _oidc_token(args)
        if args.tls_ca:
            tls = TlsOptions(
                Path(args.tls_ca),
                args.tls_cert and Path(args.tls_cert),
                args.tls_key and Path(args.tls_key),
                args.tls_server_name,
            )
        elif args.tls_cert or args.tls_key:
            raise UsageError("--tls-cert/--tls-key need --tls-ca (the daemon's CA)")
        else:
            plaintext.check_plaintext(args.server, args.insecure)
        return Client(
            args.server,
            tls,
            timeout=args.timeout,
            oidc_token=oidc_token,
            connections=args.connections,
        )

    return connect


def _fail(prefix: str, message: str, code: int) -> int:
    print(f"hsmsign: {prefix}: {message}", file=sys.stderr)
    return code


def _os_error_message(e: OSError) -> str:
    what = e.strerror or type(e).__name__
    return f"{e.filename}: {what}" if e.filename else what


def _stdout_gone() -> int:
    # The reader went away (``hsmsign keys list | head``): stop quietly, and point stdout at
    # /dev/null so that the interpreter's last flush at exit does not fail again.
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run ``hsmsign``; returns the exit code. The one place errors become messages."""
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args, _connector(args))
        sys.stdout.flush()
        return result
    except VerificationError as e:
        return _fail("verification failed", str(e), e.exit_code)
    except Error as e:
        return _fail("error", str(e), e.exit_code)
    except (keycommands.BadArguments, names.UnknownName) as e:
        return _fail("error", str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        print("hsmsign: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _stdout_gone()
    except OSError as e:
        return _fail("error", _os_error_message(e), EXIT_ERROR)


if __name__ == "__main__":
    sys.exit(main())
