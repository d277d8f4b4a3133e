"""The daemon's configuration: one TOML file read into frozen, documented dataclasses.

This is the only module that reads configuration. Every error names the file, the key and
what is allowed. Relative paths are relative to the config file's directory. The user PIN is
never part of the config text: it comes from a file (mode 0600 or stricter), an environment
variable or a systemd credential.
"""

from __future__ import annotations

import os
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from server import cpus, pinsource
from server.audit import config as audit_config
from server.errors import ConfigError
from server.limitsconfig import ConnectionLimits, read_limits
from server.policy.config import TABLES as ACCESS_TABLES
from server.policy.config import AccessConfig, load_access
from server.tomltable import Table, default_of

ThreadingMode = Literal["parallel", "serialized"]

#: Modules known to initialise the real module with OS locking whatever the caller passes to
#: C_Initialize (docs/design-facts.md, fact 1), so that several sessions may be used at once.
LOCKING_PROXIES = frozenset({"p11-kit-proxy.so"})


@dataclass(frozen=True)
class PinSource:
    """Where the user PIN comes from; exactly one is set."""

    file: Path | None = None
    env: str | None = None
    credential: str | None = None

    def describe(self) -> str:
        if self.file is not None:
            return f"file {self.file}"
        if self.env is not None:
            return f"environment variable {self.env}"
        return f"systemd credential {self.credential}"

    def read(self) -> str:
        """Returns the PIN. Raises ConfigError when it is missing or its file could have been
        read or replaced by others (server/pinsource.py)."""
        if self.file is not None:
            return pinsource.read_secret_file(self.file, "token.pin_file")
        if self.env is not None:
            return pinsource.take_from_environment(self.env)
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"token.pin_credential = {self.credential!r} needs CREDENTIALS_DIRECTORY "
                "(run under systemd with LoadCredential=)"
            )
        path = Path(directory) / str(self.credential)
        return pinsource.read_secret_file(path, "token.pin_credential", root_may_own=True)


#: token.sessions when not set: per serving process. Two suit SoftHSM2, whose signing runs on
#: the daemon's own CPUs (docs/performance.md); an HSM that answers over the network wants
#: about its own parallelism divided by server.processes.
DEFAULT_SESSIONS = 2
#: Upper bound for server.processes: each process logs in and opens its own sessions.
MAX_PROCESSES = 64
#: server.processes when not set: ``default_processes``.
PROCESSES_AUTO = "auto"
#: "auto" stops here: past a few processes an HSM's own limit dominates, while every process
#: costs the token a login and sessions. Larger machines set a number.
MAX_AUTO_PROCESSES = 8


@dataclass(frozen=True)
class TokenConfig:
    """[token]: which PKCS#11 module and token to use, how to log in, and how to use it.

    ``label`` and ``serial`` may also come from an RFC 7512 URI (``uri = "pkcs11:token=..."``);
    the PIN from exactly one of ``pin_file``, ``pin_env`` and ``pin_credential``.
    """

    #: Path of the PKCS#11 module (.so). For SoftHSM2 use p11-kit-proxy.so (thread-safe).
    module: Path
    #: Where the user PIN comes from (``pin_file``, ``pin_env`` or ``pin_credential``).
    pin: PinSource
    #: "parallel": sessions used from many threads at once (module must be thread-safe);
    #: "serialized": every PKCS#11 call behind one lock. Default: ``default_threading``
    #: (parallel for a module in LOCKING_PROXIES, serialized for any other).
    threading: ThreadingMode
    #: Token label to select (exactly one of label and serial, or a PKCS#11 URI).
    label: str | None = None
    #: Token serial number to select.
    serial: str | None = None
    #: Environment variables set before the module loads (e.g. SOFTHSM2_CONF).
    environment: Mapping[str, str] = field(default_factory=dict)
    #: Sessions in the pool (besides the login session), in each serving process.
    sessions: int = DEFAULT_SESSIONS
    #: Seconds a call waits for a free session before RESOURCE_EXHAUSTED.
    session_wait_seconds: float = 5.0
    #: Seconds one token operation (a signature, a decryption, a key-ring read: a few
    #: PKCS#11 calls) may take. Past it the session is given up, the call fails with
    #: UNAVAILABLE, and health is NOT_SERVING until the token answers again
    #: (server/pkcs11/watchdog.py). SoftHSM2 answers in milliseconds; for a network HSM allow
    #: its worst failover time (docs/operations.md, "Token call limits").
    call_timeout_seconds: float = 10.0
    #: The same limit for generating a key pair (RSA-4096 prime search takes seconds).
    keygen_timeout_seconds: float = 300.0
    #: Seconds a call may stay past its limit before the process exits with code 75 (the
    #: module is wedged; a new process initialises it again).
    stuck_exit_seconds: float = 10.0

    def describe_token(self) -> str:
        return f"label {self.label!r}" if self.label is not None else f"serial {self.serial!r}"


def default_threading(module: Path) -> ThreadingMode:
    """token.threading when not set: parallel only for a module known to lock for itself."""
    return "parallel" if module.name in LOCKING_PROXIES else "serialized"


@dataclass(frozen=True)
class TlsConfig:
    """[server.tls]: server TLS. With ``client_ca`` set, clients must present a certificate
    it signed."""

    #: The server's certificate chain (PEM).
    cert: Path
    #: The server's private key (PEM).
    key: Path
    #: CAs (one PEM file, one or more certificates) whose client certificates are required;
    #: unset: no client certificates. Who a certificate is: [[identities.mtls]].
    client_ca: Path | None = None


@dataclass(frozen=True)
class ServerConfig:
    """[server]: the gRPC server and its serving processes."""

    #: Serving processes sharing the port (SO_REUSEPORT), each with its own token login,
    #: session pool and threads; 1 serves from the daemon's own process
    #: (docs/adr/0003-serving-processes.md).
    #: Default "auto": ``default_processes`` (one per CPU the daemon may use, at most
    #: MAX_AUTO_PROCESSES).
    processes: int
    #: Threads serving calls, in each serving process. Default: ``default_threads``
    #: (twice token.sessions, so a call can be read and answered while its neighbour signs).
    #: Formerly ``workers``, which is still read.
    threads: int
    #: host:port to listen on; port 0 picks a free port (written to --ready-file).
    listen: str = "127.0.0.1:50051"
    #: host:port of a second, plaintext listener serving only the health service (for
    #: Kubernetes gRPC probes, which speak no TLS); unset: health only on ``listen``.
    health_listen: str | None = None
    #: host:port of a plaintext HTTP listener serving Prometheus metrics at /metrics, summed
    #: over the serving processes (server/metrics.py); unset: no metrics.
    metrics_listen: str | None = None
    #: "unix:/ABSOLUTE/PATH" of a unix socket serving KeyAdmin, and KeyAdmin only there: the
    #: network listener then refuses every KeyAdmin call, and callers on the socket are the
    #: identity ``admin-socket`` (who may connect is the socket's owner, group and mode 0660).
    #: Unset: KeyAdmin on ``listen``, as the policy grants (and ``key_admin`` allows).
    admin_listen: str | None = None
    #: Calls gRPC itself holds at once in each serving process (running, waiting in
    #: hsmsignd's queue, or still being received on the event loop); beyond it gRPC refuses
    #: ("Concurrent RPC limit exceeded!") before hsmsignd sees the call, so with no access-log
    #: line or audit record. A backstop for memory (each holds at most one request of
    #: server.limits.max_request_bytes): hsmsignd's own bound (server.limits.max_queued_calls)
    #: refuses first, and this must be above the serving threads (server.threads +
    #: token.sessions + server.limits.max_queued_calls).
    max_concurrent_calls: int = 1024
    #: Seconds SIGTERM waits for in-flight calls before cancelling them.
    grace_seconds: float = 10.0
    #: Serve gRPC server reflection (for grpcurl and friends).
    reflection: bool = True
    #: Serve the KeyAdmin service (create, rotate, import, destroy keys) on this daemon.
    key_admin: bool = True
    #: Accept ImportKey with the private key in clear (a ceremony, on the admin socket,
    #: ``admin_listen``, only); otherwise only the wrapped form (docs/operations.md).
    allow_plaintext_import: bool = False
    #: Server TLS; unset: plaintext.
    tls: TlsConfig | None = None
    #: Message sizes, keepalive and connection lifetimes ([server.limits]).
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: Seconds between a serving process's heartbeats to its supervisor (server/heartbeat.py).
    heartbeat_seconds: float = 1.0
    #: Seconds without a heartbeat after which the supervisor kills a serving process and
    #: starts a new one (a stopped or frozen process). Its callers wait this long at most.
    heartbeat_timeout_seconds: float = 5.0


def default_threads(sessions: int) -> int:
    """server.threads when not set: two per session (more only queue on the GIL)."""
    return 2 * sessions


def default_processes() -> int:
    """server.processes = "auto" (the default): one per CPU, at most MAX_AUTO_PROCESSES."""
    return min(cpus.available_cpus(), MAX_AUTO_PROCESSES)


@dataclass(frozen=True)
class KeyRingConfig:
    """[keyring]: how the key ring follows the token."""

    #: Seconds between re-reads of the key ring from the token (changes made by other
    #: processes are seen within this bound).
    refresh_seconds: float = 2.0
    #: Minimum delay for ScheduleKeyVersionDestruction, in hours: at least
    #: DESTRUCTION_DELAY_FLOOR_HOURS unless dev_unsafe_allow_short_destruction_delay.
    min_destruction_delay_hours: float = 24.0
    #: Allows a minimum below DESTRUCTION_DELAY_FLOOR_HOURS: development and tests only.
    dev_unsafe_allow_short_destruction_delay: bool = False
    #: The file every hsmsign process on this host locks while it reads or changes the ring's
    #: token objects (server.keyring.hostlock); empty: /run/lock/hsmsign-keyring-<token>.lock.
    lock_file: str = ""

    @property
    def min_destruction_delay_seconds(self) -> float:
        return self.min_destruction_delay_hours * 3600

    def floor_warning(self) -> str | None:
        """The warning to log when the minimum destruction delay is below the floor."""
        hours = self.min_destruction_delay_hours
        if hours >= DESTRUCTION_DELAY_FLOOR_HOURS:
            return None
        return (
            f"keyring.{SHORT_DESTRUCTION_DELAY_KEY} = true: the minimum destruction delay is "
            f"{hours:g} hours, below the floor of {DESTRUCTION_DELAY_FLOOR_HOURS} hours; a key "
            "version can be destroyed before anyone notices. For development and tests only"
        )


@dataclass(frozen=True)
class KeyOptions:
    """[keys.NAME]: per-key exceptions to the defaults."""

    #: Use the key even if the token reports its private key as extractable.
    allow_extractable: bool = False
    #: Allow PKCS#1 v1.5 decryption (with implicit rejection) for unwrap.
    allow_pkcs1v15_unwrap: bool = False


@dataclass(frozen=True)
class Config:
    """The whole file: top-level keys and one dataclass per table."""

    #: The file it was read from (relative paths in it are relative to its directory).
    path: Path
    token: TokenConfig
    server: ServerConfig
    keyring: KeyRingConfig = KeyRingConfig()
    keys: Mapping[str, KeyOptions] = field(default_factory=dict)
    #: DEBUG, INFO, WARNING or ERROR.
    log_level: str = "INFO"
    #: [identities] and [policy]: who callers are and what they may do (server/policy).
    access: AccessConfig = field(default_factory=AccessConfig)
    #: [audit]: the durable audit trail (server/audit; none without ``[audit] path``).
    audit: audit_config.AuditConfig = field(default_factory=audit_config.AuditConfig)

    def key_options(self, name: str) -> KeyOptions:
        return self.keys.get(name, KeyOptions())


def _parse_uri(table: Table, uri: str) -> tuple[str | None, str | None]:
    """Token label and serial from an RFC 7512 PKCS#11 URI such as ``pkcs11:token=Prod%20HSM``."""
    if not uri.startswith("pkcs11:"):
        raise table.error("uri", f"got {uri!r}; allowed: an RFC 7512 URI starting with 'pkcs11:'")
    path = uri[len("pkcs11:") :].split("?", 1)[0]
    attrs: dict[str, str] = {}
    for part in filter(None, path.split(";")):
        k, sep, v = part.partition("=")
        if not sep:
            raise table.error("uri", f"attribute {part!r} has no '='")
        attrs[k] = urllib.parse.unquote(v)
    if "pin-value" in attrs or "pin-source" in attrs:
        raise table.error("uri", "must not carry a PIN; use pin_file, pin_env or pin_credential")
    label, serial = attrs.get("token"), attrs.get("serial")
    if label is None and serial is None:
        raise table.error("uri", "names no token; add token=LABEL or serial=SERIAL")
    return label, serial


def _token(root: Table) -> TokenConfig:
    t = root.table("token")
    module = t.required_path("module")
    label = t.get("label", str, default_of(TokenConfig, "label"), "the token label")
    serial = t.get("serial", str, default_of(TokenConfig, "serial"), "the token serial number")
    uri = t.get("uri", str, None, "a PKCS#11 URI")
    if uri is not None:
        if label is not None or serial is not None:
            raise t.error("uri", "give either uri or label/serial, not both")
        label, serial = _parse_uri(t, uri)
    if label is None and serial is None:
        raise t.error("label", "is required: the token label (or give serial, or uri)")
    if "pin" in t.data:
        raise t.error(
            "pin", "PINs never go in the config file; use pin_file, pin_env or pin_credential"
        )
    pin_file = t.path_value("pin_file")
    pin_env = t.get("pin_env", str, None, "an environment variable name")
    pin_cred = t.get("pin_credential", str, None, "a systemd credential name")
    given = [x for x in (pin_file, pin_env, pin_cred) if x is not None]
    if len(given) != 1:
        raise t.error("pin_file", "exactly one of pin_file, pin_env, pin_credential is required")
    env_table = t.table("environment")
    environment: dict[str, str] = {}
    for k, v in env_table.data.items():
        if not isinstance(v, str):
            raise env_table.error(k, f"got {v!r}; allowed: a string")
        # Values that look like relative paths are relative to the config file.
        if v.startswith(("./", "../")):
            v = str((root.path.parent / v).resolve())
        environment[k] = v
        env_table.used.add(k)
    threading = t.get("threading", str, default_threading(module), '"parallel" or "serialized"')
    if threading not in ("parallel", "serialized"):
        raise t.error("threading", f'got {threading!r}; allowed: "parallel" or "serialized"')
    sessions = t.positive("sessions", int, default_of(TokenConfig, "sessions"), 256)
    wait = t.positive(
        "session_wait_seconds", float, default_of(TokenConfig, "session_wait_seconds"), 600
    )
    limits = {
        name: t.positive(name, float, default_of(TokenConfig, name), 86400)
        for name in ("call_timeout_seconds", "keygen_timeout_seconds", "stuck_exit_seconds")
    }
    t.finish()
    return TokenConfig(
        module=module,
        label=label,
        serial=serial,
        pin=PinSource(file=pin_file, env=pin_env, credential=pin_cred),
        environment=environment,
        threading=threading,
        sessions=sessions,
        session_wait_seconds=wait,
        **limits,
    )


def _threads(s: Table, sessions: int) -> int:
    """server.threads, or its former name server.workers (still read; not both)."""
    if "workers" in s.data:
        if "threads" in s.data:
            raise s.error("workers", "is the former name of threads; give only threads")
        return int(s.positive("workers", int, default_threads(sessions), 1024))
    return int(s.positive("threads", int, default_threads(sessions), 1024))


def _address(s: Table, key: str, default: str | None) -> Any:
    """A "HOST:PORT" value (``default`` when absent). Raises ConfigError."""
    value = s.get(key, str, default, '"HOST:PORT"')
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise s.error(key, f'got {value!r}; allowed: "HOST:PORT" such as "127.0.0.1:50051"')
    return value


def _admin_socket(s: Table) -> str | None:
    """``admin_listen``: "unix:/ABSOLUTE/PATH" or unset. Raises ConfigError."""
    value: str | None = s.get("admin_listen", str, None, '"unix:/ABSOLUTE/PATH"')
    if value is None:
        return None
    if not value.startswith("unix:"):
        raise s.error(
            "admin_listen",
            f'got {value!r}; allowed: a unix socket, "unix:/ABSOLUTE/PATH" such as '
            '"unix:/run/hsmsign/admin.sock" (for KeyAdmin on the network, run a second daemon '
            "with key_admin = true on its own listen address)",
        )
    if not value[len("unix:") :].startswith("/"):
        raise s.error(
            "admin_listen", f'got {value!r}; allowed: an absolute path, "unix:/ABSOLUTE/PATH"'
        )
    return value


def _server(root: Table, sessions: int) -> ServerConfig:
    s = root.table("server")
    listen = _address(s, "listen", default_of(ServerConfig, "listen"))
    health_listen = _address(s, "health_listen", None)
    metrics_listen = _address(s, "metrics_listen", None)
    admin_listen = _admin_socket(s)
    threads = _threads(s, sessions)
    max_calls = s.positive(
        "max_concurrent_calls", int, default_of(ServerConfig, "max_concurrent_calls"), 100_000
    )
    grace = s.positive("grace_seconds", float, default_of(ServerConfig, "grace_seconds"), 3600)
    reflection = s.get("reflection", bool, default_of(ServerConfig, "reflection"), "true or false")
    processes = _processes(s)
    key_admin = s.get("key_admin", bool, default_of(ServerConfig, "key_admin"), "true or false")
    limits = read_limits(s)
    heartbeat = s.positive(
        "heartbeat_seconds", float, default_of(ServerConfig, "heartbeat_seconds"), 60
    )
    heartbeat_timeout = s.positive(
        "heartbeat_timeout_seconds",
        float,
        default_of(ServerConfig, "heartbeat_timeout_seconds"),
        3600,
    )
    if heartbeat_timeout < 2 * heartbeat:
        raise s.error(
            "heartbeat_timeout_seconds",
            f"got {heartbeat_timeout:g}; allowed: at least twice heartbeat_seconds ({heartbeat:g})",
        )
    # gRPC must never refuse a call that hsmsignd's queue has room for (its refusal leaves
    # no trace): its bound is above every call hsmsignd may hold or be handing a thread.
    below = threads + sessions + limits.max_queued_calls  # admission.serving_threads
    if max_calls <= below:
        raise s.error(
            "max_concurrent_calls",
            f"got {max_calls}; allowed: above server.threads + token.sessions + "
            f"server.limits.max_queued_calls ({below}), so that hsmsignd refuses excess calls "
            "itself",
        )
    allow_plaintext_import = s.get(
        "allow_plaintext_import",
        bool,
        default_of(ServerConfig, "allow_plaintext_import"),
        "true or false",
    )
    tls: TlsConfig | None = None
    s.used.add("tls")  # listed among the allowed keys even when absent
    if "tls" in s.data:
        tt = s.table("tls")
        if "admin_clients" in tt.data:
            raise tt.error(
                "admin_clients",
                "replaced by [[identities.mtls]] rules (each matches one certificate field) "
                "and [[policy.grant]] (docs/operations.md, Policy)",
            )
        tls = TlsConfig(
            cert=tt.required_path("cert"),
            key=tt.required_path("key"),
            client_ca=tt.path_value("client_ca"),
        )
        tt.finish()
    s.finish()
    return ServerConfig(
        processes=processes,
        threads=threads,
        listen=listen,
        health_listen=health_listen,
        metrics_listen=metrics_listen,
        admin_listen=admin_listen,
        max_concurrent_calls=max_calls,
        grace_seconds=grace,
        reflection=reflection,
        key_admin=key_admin,
        allow_plaintext_import=allow_plaintext_import,
        tls=tls,
        limits=limits,
        heartbeat_seconds=heartbeat,
        heartbeat_timeout_seconds=heartbeat_timeout,
    )


#: The largest value each [server.limits] key accepts (every one must be above 0).
def _processes(s: Table) -> int:
    allowed = (
        f'"auto" (one per CPU, at most {MAX_AUTO_PROCESSES}) or a number from 1 to {MAX_PROCESSES}'
    )
    value = s.get("processes", (int, str), PROCESSES_AUTO, allowed)
    if value == PROCESSES_AUTO:
        return default_processes()
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_PROCESSES:
        raise s.error("processes", f"got {value!r}; allowed: {allowed}")
    return value


#: keyring.min_destruction_delay_hours may not go below this (a mistaken or malicious
#: schedule-destroy must leave a day to notice and cancel it) ...
DESTRUCTION_DELAY_FLOOR_HOURS = 24
#: ... unless this loudly named setting says so, for development and tests.
SHORT_DESTRUCTION_DELAY_KEY = "dev_unsafe_allow_short_destruction_delay"


def _keyring(root: Table) -> KeyRingConfig:
    k = root.table("keyring")
    refresh = k.positive(
        "refresh_seconds", float, default_of(KeyRingConfig, "refresh_seconds"), 3600
    )
    min_delay = k.get(
        "min_destruction_delay_hours",
        float,
        default_of(KeyRingConfig, "min_destruction_delay_hours"),
        "hours, a number >= 24",
    )
    short_ok = k.get(
        SHORT_DESTRUCTION_DELAY_KEY,
        bool,
        default_of(KeyRingConfig, SHORT_DESTRUCTION_DELAY_KEY),
        "true or false",
    )
    if min_delay < 0:
        raise k.error("min_destruction_delay_hours", f"got {min_delay!r}; allowed: a number >= 0")
    if min_delay < DESTRUCTION_DELAY_FLOOR_HOURS and not short_ok:
        raise k.error(
            "min_destruction_delay_hours",
            f"got {min_delay:g}, below the floor of {DESTRUCTION_DELAY_FLOOR_HOURS} hours; only "
            f"{SHORT_DESTRUCTION_DELAY_KEY} = true (development and tests) lowers it",
        )
    lock_file = k.get("lock_file", str, default_of(KeyRingConfig, "lock_file"), "a file path")
    k.finish()
    return KeyRingConfig(
        lock_file=lock_file,
        refresh_seconds=refresh,
        min_destruction_delay_hours=min_delay,
        dev_unsafe_allow_short_destruction_delay=short_ok,
    )


def _keys(root: Table) -> dict[str, KeyOptions]:
    keys = root.table("keys")
    out: dict[str, KeyOptions] = {}
    for name in list(keys.data):
        kt = keys.table(name)
        out[name] = KeyOptions(
            **{f.name: kt.get(f.name, bool, f.default, "true or false") for f in fields(KeyOptions)}
        )
        kt.finish()
    return out


def load(path: Path) -> Config:
    """Reads and validates a config file: the one loader. Raises ConfigError naming the file
    and key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    root = Table(path.resolve(), "", raw)
    allowed_levels = "DEBUG, INFO, WARNING or ERROR"
    level = root.get("log_level", str, default_of(Config, "log_level"), allowed_levels).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise root.error("log_level", f"got {level!r}; allowed: {allowed_levels}")
    token = _token(root)
    config = Config(
        path=root.path,
        token=token,
        server=_server(root, token.sessions),
        keyring=_keyring(root),
        keys=_keys(root),
        log_level=level,
        access=load_access(root.path, raw),
        audit=audit_config.parse(root.table("audit").data, root.path),
    )
    root.used |= ACCESS_TABLES
    root.finish()
    return config


#: Where ``hsmsignd`` reads its config when neither --config nor $HSMSIGN_CONFIG names one,
#: in an installed package: where deploy/ (systemd unit, container, Kubernetes) puts it.
INSTALLED_CONFIG = Path("/etc/hsmsign/hsmsignd.toml")
#: The SoftHSM2 development config, in a source checkout (what `make run` uses).
SOURCE_TREE_CONFIG = Path(__file__).resolve().parent.parent / "hsm_config" / "dev.toml"


def default_config_path(
    environ: Mapping[str, str] = os.environ, source_tree_config: Path = SOURCE_TREE_CONFIG
) -> Path:
    """The config file when --config is not given: $HSMSIGN_CONFIG; else, in a source
    checkout, its hsm_config/dev.toml (the dev token's config, whose relative paths point into
    the checkout); else INSTALLED_CONFIG. The dev config is not shipped in the package: its
    paths name files of the checkout (softhsm/dev/), which an installed package does not have.
    """
    env = environ.get("HSMSIGN_CONFIG")
    if env:
        return Path(env)
    if source_tree_config.is_file():
        return source_tree_config
    return INSTALLED_CONFIG
