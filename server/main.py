"""hsmsignd: the command line, and the one place where errors become exit codes.

``hsmsignd [--config FILE] [serve]`` runs the daemon (``server.serve``). ``hsmsignd keys ...``
works on the token directly with no daemon running (key ceremonies, offline HSMs, the dev
token's demo key). Every failure is one line on stderr and a non-zero exit: each
``ServerError`` carries its exit code (2 for a bad config or usage, 1 when the token or network
refuses).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from server import config as config_mod
from server import hardening, keys_cli, logsink, serve
from server.api import accesslog
from server.errors import ConfigError, ServerError
from server.supervisor import ServingProcessSpec


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hsmsignd",
        description="Serve RSA signing and session-key unwrap from a PKCS#11 token over gRPC.",
        epilog="Config reference: hsm_config/production.example.toml. Docs: docs/operations.md",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="config file (default: $HSMSIGN_CONFIG; else, in a source checkout, "
        f"hsm_config/dev.toml; else {config_mod.INSTALLED_CONFIG})",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve_parser = sub.add_parser(
        "serve",
        help="run the daemon (the default command)",
        description="Run the daemon: serve the Signer and KeyAdmin gRPC services until "
        "SIGTERM or SIGINT, then drain the calls in flight.",
    )
    for sp in (p, serve_parser):
        sp.add_argument(
            "--listen",
            metavar="HOST:PORT",
            default=None,
            help="override server.listen (port 0 picks a free port)",
        )
        sp.add_argument(
            "--ready-file",
            type=Path,
            default=None,
            metavar="FILE",
            help="write {address, pid} as JSON here once serving (with several serving "
            "processes also workers: their PIDs)",
        )
        # Internal: how the supervisor starts a serving process (server/supervisor.py).
        sp.add_argument("--serving-process", default=None, help=argparse.SUPPRESS)
    keys_cli.add_parser(sub)
    return p


class _Formatter(logging.Formatter):
    """The standard line, with the date and time formatted once per second, not per record
    (strftime per record is a visible share of the access log's cost under load)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return accesslog.timestamp(record.created)


def _setup_logging(level: str, tag: str = "") -> None:
    """Logs to stderr at ``level``; ``tag`` prefixes the logger name (serving processes)."""
    # The line format uses none of these: skip collecting them for every record (the
    # logging HOWTO's "Optimization" section).
    logging._srcfile = None  # no caller frame walk
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(logsink.TextStream(logsink.sink(sys.stderr.fileno())))
    handler.setFormatter(_Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler])
    accesslog.access.configure(sys.stderr.fileno(), tag)
    # grpc's own loggers are chatty about client disconnects at INFO.
    logging.getLogger("grpc").setLevel(logging.WARNING)


def _run(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config or config_mod.default_config_path())
    if args.command not in (None, "serve"):
        _setup_logging(cfg.log_level)
        return keys_cli.run(args, cfg)
    if args.serving_process is None:
        _setup_logging(cfg.log_level)
        return serve.run_daemon(cfg, args.listen, args.ready_file)
    spec = ServingProcessSpec.decode(args.serving_process)
    # Serving processes log through the supervisor's stderr: tag their lines.
    logging.getLogger().handlers.clear()
    _setup_logging(cfg.log_level, f"[{spec.index}/{spec.count}] ")
    return serve.run_serving_process(cfg, args.listen or cfg.server.listen, spec)


def main(argv: list[str] | None = None) -> int:
    """Runs hsmsignd; returns its exit code. Every error is one line on stderr."""
    try:
        hardening.forbid_core_dumps()  # before any secret is read
    except ServerError as e:
        print(f"hsmsignd: error: {e}", file=sys.stderr)
        return e.exit_code
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as e:
        print(f"hsmsignd: config error: {e}", file=sys.stderr)
        return e.exit_code
    except ServerError as e:
        print(f"hsmsignd: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:
        # stdout closed early (`hsmsignd keys list | head`): the reader has what it wanted.
        # Point stdout at /dev/null so that the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"hsmsignd: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
