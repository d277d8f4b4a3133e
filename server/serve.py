"""Serving: the one start-up order, and one serving process (gRPC server, health, reflection,
drain, ready file).

``run_daemon`` starts hsmsignd the same way whatever ``server.processes`` says: it checks the
config's TLS files, then the token (one login, the key ring, the ``[keys.NAME]`` tables, the
implicit-rejection secret), then the port. With one serving process it then serves from this
process; with several it closes its token session and hands over to ``server.supervisor``,
which starts that many processes running ``run_serving_process``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server import metrics, ready, reload, supervisor, tls
from server.api import admission, deadlines, limits, pipeline
from server.api.admin import KeyAdminService
from server.api.signer import SignerService
from server.audit import serving as audit_serving
from server.config import Config
from server.errors import StartupError, TokenNotFound, cannot_listen
from server.health import Health
from server.keyring.ring import KeyRing
from server.loopserver import LoopServer
from server.pkcs11.token import Token, TokenState
from server.policy import gate
from server.supervisor import ServingProcessSpec, SharedCounter

log = logging.getLogger("hsmsignd")

#: Seconds a stopping process keeps its connections open after its last call returned.
DRAIN_LINGER_SECONDS = 1.0


def credentials(cfg: Config) -> grpc.ServerCredentials | None:
    """The server's TLS credentials (None: plaintext); a SIGHUP swaps their certificate and
    client CA for new handshakes (``server.reload``). Raises ConfigError for a TLS file that
    cannot be read or does not match the others."""
    return tls.credentials(tls.read_tls(cfg))


def check_token(token: Token, ring: KeyRing) -> None:
    """What every serving process needs of the token, checked once at start-up: the
    ``[keys.NAME]`` tables name keys that exist (StartupError if not), warnings about
    extractable keys are logged, and the implicit-rejection secret exists (so no two serving
    processes create one each)."""
    for warning in ring.check_config():
        log.warning("%s", warning)
    with token.session("preparing the implicit-rejection secret") as s:
        s.implicit_rejection_mac(b"hsmsignd start-up")


def run_daemon(cfg: Config, listen: str | None, ready_file: Path | None) -> int:
    """Starts hsmsignd: TLS files, then the token, then the port; serves until SIGTERM or
    SIGINT. Raises ConfigError or StartupError (one line) when it cannot start."""
    # A SIGHUP before serving (the reload is not set up yet) must not end the daemon.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    creds = credentials(cfg)
    address = listen or cfg.server.listen
    # Who may call, and a listener the config allows: stops a bad start before the token.
    gate.install(gate.Gate(cfg.access, cfg, address))
    if floor_warning := cfg.keyring.floor_warning():
        log.warning("%s", floor_warning)
    if cfg.server.metrics_listen is not None:
        # Before any serving process starts: they inherit where to count.
        served = metrics.serve_endpoint(cfg.server.metrics_listen)
        log.info("metrics on http://%s/metrics", served)
    try:
        return _check_and_serve(cfg, ready_file, creds, address)
    finally:
        metrics.close()


def _check_and_serve(
    cfg: Config,
    ready_file: Path | None,
    creds: grpc.ServerCredentials | None,
    address: str,
) -> int:
    """The token, then the port; serves (one process) or supervises (several)."""
    token = Token(cfg.token)
    try:
        ring = KeyRing(token, cfg)
        try:
            check_token(token, ring)
            keys = ready.keys_summary(ring.list_keys())
            if cfg.server.processes == 1:
                metrics.start_counting()
                server, bound = listen_on(cfg, address, creds, reuse_port=False)
                role = _Standalone(ready.listening_line(cfg, bound, token.label, keys), ready_file)
                return serve_process(cfg, token, ring, server, bound, role)
        finally:
            ring.stop()
        label = token.label
    finally:
        token.close()
    # Several serving processes: each logs in itself; this process only supervises them.
    return supervisor.run(
        cfg, address, ready_file, lambda bound: ready.listening_line(cfg, bound, label, keys)
    )


def run_serving_process(cfg: Config, listen: str, spec: ServingProcessSpec) -> int:
    """One of several serving processes started by the supervisor, which has checked the
    token and reserved the port already."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve_process can reload
    gate.install(gate.Gate(cfg.access, cfg, listen))
    if cfg.server.metrics_listen is not None:
        metrics.start_counting()  # into the directory the supervisor serves
    siblings = SharedCounter(spec.counter_fd)
    # One serving process at a time loads the module and logs in: SoftHSM2 processes that do
    # so at the same moment can miss the token ("no token with label") or fail the login
    # (GeneralError); this was the cause of start-ups failing now and then with several
    # serving processes.
    with siblings.objects_exclusive():
        token = _open_token(cfg)
    try:
        ring = KeyRing(token, cfg, siblings)
        try:
            ring.check_config()  # the supervisor logged its warnings once
            server, bound = listen_on(
                cfg, listen, credentials(cfg), reuse_port=True, admin_socket=spec.index == 1
            )
            # The heartbeat's self-check: the token-call watchdog runs, and the event loop
            # answers within half the time the supervisor allows a silent process.
            loop_bound = cfg.server.heartbeat_timeout_seconds / 2

            def check() -> bool:
                return token.watchdog.alive() and server.responsive(loop_bound)

            role = _ServingProcess(spec, cfg, check)
            return serve_process(cfg, token, ring, server, bound, role)
        finally:
            ring.stop()
    finally:
        token.close()


def _open_token(cfg: Config) -> Token:
    """Opens the token in a serving process. The supervisor has just found it, so a miss is
    a SoftHSM2 token being rewritten by another process at that instant (seen when three
    processes started at once): look again a few times before giving up."""
    for attempt in range(5):
        try:
            return Token(cfg.token)
        except TokenNotFound:
            if attempt == 4:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def watch_token(token: Token, ring: KeyRing, status: Health, stop: threading.Event) -> None:
    """Health follows the token and the key ring; a PIN the token refused at a re-login
    stops the serving process (``serve_process`` then raises the token's PinRefused: exit
    77, never restarted). The one place that decides this."""

    def on_token(state: TokenState, why: str) -> None:
        if state is TokenState.CLOSED:
            return  # stopping anyway
        status.set("token", state is TokenState.USABLE, why)
        if state is TokenState.PIN_REFUSED:
            stop.set()  # the token logged why; main prints the exit line

    token.add_listener(on_token)
    ring.add_listener(lambda ok, why: status.set("keyring", ok, why))


def listen_on(
    cfg: Config,
    address: str,
    creds: grpc.ServerCredentials | None,
    *,
    reuse_port: bool,
    admin_socket: bool = True,
) -> tuple[LoopServer, str]:
    """A gRPC server bound to ``address`` (not started yet) and the address it is bound to:
    grpc.aio, its calls run on ``server.threads`` serving threads once their request has
    arrived (``server.loopserver``).

    ``reuse_port``: serving processes share the supervisor's port; a lone daemon must own its
    port. ``admin_socket``: this process also serves ``server.admin_listen`` (one process of
    a daemon does: a unix socket cannot be shared). Raises StartupError when an address
    cannot be bound.
    """
    server = LoopServer(
        cfg.server,
        limits.server_options(cfg.server.limits, reuse_port),
        threads=admission.serving_threads(cfg),
    )
    port = server.add_port(address, creds)
    health_address = cfg.server.health_listen
    if (
        port != 0
        and health_address is not None
        and server.add_health_port(health_address, reuse_port) == 0
    ):
        server.stop(0)
        raise cannot_listen(health_address)
    if port == 0:
        server.stop(0)
        raise cannot_listen(address)
    if admin_socket and cfg.server.admin_listen is not None:
        try:
            _bind_admin_socket(server, cfg.server.admin_listen)
        except StartupError:
            server.stop(0)
            raise
    return server, f"{address.rpartition(':')[0]}:{port}"


#: Who may connect to the admin socket: the daemon's user and group (docs/operations.md).
ADMIN_SOCKET_MODE = 0o660


def _bind_admin_socket(server: LoopServer, listen: str) -> None:
    """Serves ``listen`` (unix:/PATH, plaintext: the socket's owner, group and mode decide who
    connects) beside the network listener. A socket file left by a process that died is
    replaced; any other file at the path is left alone. Raises StartupError."""
    path = Path(listen[len("unix:") :])
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    if server.add_port(listen, None) == 0:
        raise StartupError(
            f"cannot serve the admin socket {listen} (does its directory exist, and is the "
            "path free?); choose another with server.admin_listen"
        )
    os.chmod(path, ADMIN_SOCKET_MODE)
    log.info("KeyAdmin on the admin socket %s only (pid %d)", listen, os.getpid())


class ServingRole(Protocol):
    """What differs between a lone daemon and one of several serving processes."""

    #: This serving process's number (1 for a lone daemon): its audit chain.
    index: int

    def serving(self, bound: str, stop: threading.Event) -> None:
        """Called once the server has started: announce it."""

    def stopping(self, signal_name: str, grace_seconds: float) -> None:
        """Called when SIGTERM or SIGINT arrives."""

    def stopped(self) -> None:
        """Called when the server has stopped."""


class _Standalone:
    """The daemon serving from its own process: it logs for itself, writes the ready file."""

    index = 1

    def __init__(self, line: str, ready_file: Path | None) -> None:
        self.line, self.ready_file = line, ready_file

    def serving(self, bound: str, stop: threading.Event) -> None:
        log.info("%s", self.line)
        if self.ready_file is not None:
            ready.write_ready_file(self.ready_file, bound)

    def stopping(self, signal_name: str, grace_seconds: float) -> None:
        log.info("%s received: draining in-flight calls (up to %gs)", signal_name, grace_seconds)

    def stopped(self) -> None:
        log.info("stopped")


class _ServingProcess:
    """One of several: the supervisor logs for the daemon and writes the ready file."""

    def __init__(self, spec: ServingProcessSpec, cfg: Config, check: Callable[[], bool]) -> None:
        self.spec, self.cfg, self.check = spec, cfg, check
        self.index = spec.index

    def serving(self, bound: str, stop: threading.Event) -> None:
        self.spec.watch_lifeline(stop)
        self.spec.start_heartbeat(self.cfg.server.heartbeat_seconds, self.check)
        log.info("%s ready on %s (pid %d)", self.spec.name, bound, os.getpid())
        self.spec.announce_ready()

    def stopping(self, signal_name: str, grace_seconds: float) -> None:
        pass

    def stopped(self) -> None:
        pass


def serve_process(
    cfg: Config, token: Token, ring: KeyRing, server: LoopServer, bound: str, role: ServingRole
) -> int:
    """Serves the Signer, KeyAdmin and health services (and reflection) on ``server`` until
    SIGTERM or SIGINT, then drains the calls in flight; the audit trail (``[audit]``) is open
    for as long as calls can be served. Returns the exit code (0). Raises StartupError when
    the audit chain is held by another process or the audit key is unusable."""
    ring.start_background_refresh()
    admission.install(admission.controller_for(cfg))
    pb_grpc.add_SignerServicer_to_server(SignerService(token, ring, cfg), server.aio)
    pb_grpc.add_KeyAdminServicer_to_server(KeyAdminService(token, ring, cfg), server.aio)
    # Served on the event loop: a health check never waits for a serving thread.
    health_servicer: health.HealthServicer = server.health
    server.health.add_to(server.aio)
    status = Health(health_servicer, cfg.server.key_admin)
    if cfg.server.reflection:
        from grpc_reflection.v1alpha import reflection

        names = [pb.DESCRIPTOR.services_by_name[n].full_name for n in ("Signer", "KeyAdmin")]
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server.aio
        )
    stop = threading.Event()
    watch_token(token, ring, status, stop)

    def on_signal(signum: int, _frame: object) -> None:
        role.stopping(signal.Signals(signum).name, cfg.server.grace_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reloader = reload.Reloader(cfg, bound)
    signal.signal(signal.SIGHUP, lambda _signum, _frame: reloader.reload_in_background())
    try:
        # The trail before the server: no call is ever served unaudited.
        audit_serving.start(
            cfg, token, role.index, lambda ok: status.set("audit", ok, "cannot write the trail")
        )
        token.watchdog.on_health(
            lambda ok: status.set("calls", ok, "a token call is past its time limit")
        )
        server.start()
        status.start()
        role.serving(bound, stop)
        stop.wait()
        health_servicer.enter_graceful_shutdown()
        # Drain before stopping gRPC: new calls get UNAVAILABLE ("retry"), calls in flight
        # finish, and their responses get a moment to leave. gRPC's own stop() closes the
        # connections once the last call has handed its response to the transport, and a large
        # response still waiting for the client's HTTP/2 flow-control credit was then cut off.
        t0 = time.monotonic()
        pipeline.calls.drain(cfg.server.grace_seconds)
        time.sleep(DRAIN_LINGER_SECONDS)
        left = max(0.0, cfg.server.grace_seconds - (time.monotonic() - t0))
        server.stop(left)
        log.info("%s", deadlines.tally.summary())
        log.info("%s", admission.summary())
        role.stopped()
        if token.pin_refusal is not None:
            raise token.pin_refusal  # exit 77: nothing may try this PIN again
        return 0
    finally:
        audit_serving.stop()  # a last signed checkpoint, after the last call
