"""The ``hsmsign`` command: dispatch only. Each command group lives in its own module.

Exit codes: 0 success, 1 an error (one line on stderr, never a traceback), 2 bad usage,
3 a signature or bundle that does not verify, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

# gRPC's C core writes its own log lines to stderr (a failed TLS handshake, for one); the CLI
# reports every failure in one line of its own, so gRPC stays quiet unless the user asks
# (GRPC_VERBOSITY=ERROR). Set before grpc is imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from hsmsign import _cli_audit, _cli_basic, _cli_bundle, _cli_keys, _cli_unwrap
from hsmsign.client import DEFAULT_SERVER, Client, TlsOptions
from hsmsign.errors import HsmsignError, UsageError, VerificationError

#: Modules that add command groups: each has ``register(subparsers)``; the parser's
#: ``func`` default is called with (args, connect).
COMMAND_MODULES = [_cli_basic, _cli_bundle, _cli_keys, _cli_unwrap, _cli_audit]

Connect = Callable[[], Client]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsmsign",
        description="Sign and seal with keys held in an HSM, through hsmsignd.",
        epilog="Key references: NAME (primary version), NAME@VERSION, sha256:FINGERPRINT, "
        "keyid:CAPGO_KEY_ID. Environment: HSMSIGN_SERVER, HSMSIGN_TLS_CA, "
        "HSMSIGN_TLS_CERT, HSMSIGN_TLS_KEY, HSMSIGN_TLS_SERVER_NAME.",
    )
    env = os.environ.get
    p.add_argument(
        "--server",
        default=env("HSMSIGN_SERVER", DEFAULT_SERVER),
        metavar="HOST:PORT",
        help=f"hsmsignd address (default {DEFAULT_SERVER})",
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
        "--tls-server-name",
        default=env("HSMSIGN_TLS_SERVER_NAME"),
        metavar="NAME",
        help="expected name in the daemon's certificate, if not the host",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def _connector(args: argparse.Namespace) -> Connect:
    def connect() -> Client:
        tls = None
        if args.tls_ca:
            tls = TlsOptions(
                Path(args.tls_ca),
                args.tls_cert and Path(args.tls_cert),
                args.tls_key and Path(args.tls_key),
                args.tls_server_name,
            )
        elif args.tls_cert or args.tls_key:
            raise UsageError("--tls-cert/--tls-key need --tls-ca (the daemon's CA)")
        return Client(args.server, tls)

    return connect


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args, _connector(args))
        return result
    except VerificationError as e:
        print(f"hsmsign: verification failed: {e}", file=sys.stderr)
        return 3
    except UsageError as e:
        print(f"hsmsign: error: {e}", file=sys.stderr)
        return 2
    except HsmsignError as e:
        print(f"hsmsign: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hsmsign: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
