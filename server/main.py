"""hsmsignd: parse flags, load config, open the token, serve gRPC, stop cleanly on SIGTERM.

``hsmsignd [--config FILE] [serve]`` runs the daemon. ``hsmsignd keys ...`` works on the token
directly with no daemon running (key ceremonies, offline HSMs, the dev token's demo key).
Every failure is one line on stderr and a non-zero exit: 2 for a bad config or usage, 1 when
the token or network refuses.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hsmsign import tlsfiles
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server import accesslog, keys_cli, logsink, rpc, supervisor
from server import config as config_mod
from server.admin_service import AdminAccess
from server.audit import serving as audit_serving
from server.config import Config
from server.errors import ConfigError, ServerError, StartupError, TokenNotFound
from server.keyring import KeyRing
from server.service import SignerService
from server.supervisor import SharedCounter, WorkerSpec
from server.token import Token

log = logging.getLogger("hsmsignd")

#: Seconds a stopping process keeps its connections open after its last call returned.
DRAIN_LINGER_SECONDS = 1.0

#: The embedded default: the SoftHSM2 dev token config shipped in the repository.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "hsm_config" / "dev.toml"


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
        help=f"config file (default: $HSMSIGN_CONFIG, else {DEFAULT_CONFIG})",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the daemon (the default command)",
        description="Run the daemon: serve the Signer and KeyAdmin gRPC services until "
        "SIGTERM or SIGINT, then drain the calls in flight.",
    )
    for sp in (p, serve):
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
        sp.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    keys_cli.add_parser(sub)
    return p


def _config_path(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    env = os.environ.get("HSMSIGN_CONFIG")
    return Path(env) if env else DEFAULT_CONFIG


class _Formatter(logging.Formatter):
    """The standard line, with the date and time formatted once per second, not per record
    (strftime was a visible share of the access log's cost under load)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return accesslog.timestamp(record.created)


def _setup_logging(level: str, tag: str = "") -> None:
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


def _credentials(cfg: Config) -> grpc.ServerCredentials | None:
    tls = cfg.server.tls
    if tls is None:
        return None
    try:
        cert, key = tls.cert.read_bytes(), tls.key.read_bytes()
        ca = tls.client_ca.read_bytes() if tls.client_ca else None
    except OSError as e:
        raise ConfigError(
            f"{cfg.path}: server.tls: cannot read {e.filename}: {e.strerror}"
        ) from None
    problem = tlsfiles.problem(
        ca,
        cert,
        key,
        ca_name=f"client_ca {tls.client_ca}",
        cert_name=f"cert {tls.cert}",
        key_name=f"key {tls.key}",
    )
    if problem:
        raise ConfigError(f"{cfg.path}: server.tls: {problem}")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def _write_ready_file(path: Path, address: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ready-")
    with os.fdopen(fd, "w") as f:
        json.dump({"address": address, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def _open_token(cfg: Config) -> Token:
    """Opens the token in a serving process. The supervisor has just found it, so a miss is
    a SoftHSM2 token being rewritten by another process at that instant (seen in CI when
    three processes started at once): look again a few times before giving up."""
    for attempt in range(5):
        try:
            return Token(cfg.token)
        except TokenNotFound:
            if attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def serve(
    cfg: Config, listen: str | None, ready_file: Path | None, worker: WorkerSpec | None = None
) -> int:
    """Serves until SIGTERM/SIGINT. With server.processes > 1 (and not itself one of them)
    this process supervises that many serving processes instead (server/supervisor.py)."""
    if worker is None:
        _credentials(cfg)  # a wrong TLS file stops the start here, once, before any process
        exposure = AdminAccess(cfg.server).exposure(listen or cfg.server.listen)
        if exposure:
            log.warning("%s", exposure)
    if worker is None and cfg.server.processes > 1:
        return supervisor.run(cfg, listen, ready_file)
    token = _open_token(cfg) if worker is not None else Token(cfg.token)
    ring: KeyRing | None = None
    try:
        ring = KeyRing(token, cfg, SharedCounter(worker.counter_fd) if worker else None)
        warnings = ring.check_config()  # raises StartupError for an unknown [keys.NAME]
        if worker is None:  # the supervisor logged them once
            for warning in warnings:
                log.warning("%s", warning)
        ring.start_background_refresh()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=cfg.server.workers, thread_name_prefix="rpc"),
            maximum_concurrent_rpcs=cfg.server.max_concurrent_calls,
            # Serving processes share the supervisor's port; a lone daemon must own its port.
            options=[("grpc.so_reuseport", 1 if worker else 0)],
        )
        pb_grpc.add_SignerServicer_to_server(SignerService(token, ring, cfg), server)
        pb_grpc.add_KeyAdminServicer_to_server(keys_cli.admin_service(token, ring, cfg), server)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        if cfg.server.reflection:
            from grpc_reflection.v1alpha import reflection

            names = [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Signer", "KeyAdmin")]
            reflection.enable_server_reflection(
                [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
            )
        address = listen or cfg.server.listen
        creds = _credentials(cfg)
        try:
            port = (
                server.add_secure_port(address, creds)
                if creds
                else server.add_insecure_port(address)
            )
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(f"cannot listen on {address} (in use, or not a local address?)")
        bound = f"{address.rpartition(':')[0]}:{port}"
        stop = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            if worker is None:
                log.info(
                    "%s received: draining in-flight calls (up to %gs)",
                    signal.Signals(signum).name,
                    cfg.server.grace_seconds,
                )
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        audit_serving.start(cfg, token, worker.index if worker else 1, health_servicer)
        server.start()
        for name in ("", "hsmsign.v1.Signer"):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        health_servicer.set(
            "hsmsign.v1.KeyAdmin",
            health_pb2.HealthCheckResponse.SERVING
            if cfg.server.key_admin
            else health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        audit_serving.apply_health()
        if worker is not None:
            worker.watch_lifeline(stop)
            log.info("%s ready on %s (pid %d)", worker.name, bound, os.getpid())
            worker.announce_ready()
        else:
            log.info("%s", supervisor.listening_line(cfg, bound, token.label, ring, 1))
            if ready_file is not None:
                _write_ready_file(ready_file, bound)
        stop.wait()
        health_servicer.enter_graceful_shutdown()
        # Drain before stopping gRPC: new calls get UNAVAILABLE ("retry"), calls in flight
        # finish, and their responses get a moment to leave. gRPC's own stop() closes the
        # connections once the last call has handed its response to the transport, and a
        # large response (10,000 signatures are 2.5 MB) still waiting for the client's
        # HTTP/2 flow-control credit was then cut off (seen in CI).
        t0 = time.monotonic()
        rpc.calls.drain(cfg.server.grace_seconds)
        time.sleep(DRAIN_LINGER_SECONDS)
        left = max(0.0, cfg.server.grace_seconds - (time.monotonic() - t0))
        server.stop(left).wait()
        if worker is None:
            log.info("stopped")
        return 0
    finally:
        audit_serving.stop()
        if ring is not None:
            ring.stop()
        token.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_mod.load(_config_path(args.config))
        _setup_logging(cfg.log_level)
        if args.command in (None, "serve"):
            worker = WorkerSpec.decode(args.worker) if args.worker else None
            if worker is not None:
                # Serving processes log through the supervisor's stderr: tag their lines.
                logging.getLogger().handlers.clear()
                _setup_logging(cfg.log_level, f"[{worker.index}/{worker.count}] ")
            return serve(cfg, args.listen, args.ready_file, worker)
        return keys_cli.run(args, cfg)
    except ConfigError as e:
        print(f"hsmsignd: config error: {e}", file=sys.stderr)
        return 2
    except ServerError as e:
        print(f"hsmsignd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
