"""The daemon's configuration: one TOML file read into frozen, documented dataclasses.

This is the only module that reads configuration. Every error names the file, the key and
what is allowed. Relative paths are relative to the config file's directory. The user PIN is
never part of the config text: it comes from a file (mode 0600 or stricter), an environment
variable or a systemd credential.
"""

from __future__ import annotations

import math
import os
import platform
import stat
import sysconfig
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from server.audit import config as audit_config
from server.errors import ConfigError

ThreadingMode = Literal["parallel", "serialized"]

#: Debian's multiarch triplet (x86_64-linux-gnu, aarch64-linux-gnu, ...): ``${MULTIARCH}`` in
#: a config path, so that one config names /usr/lib/<triplet>/ on every architecture.
MULTIARCH = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"

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
        """Returns the PIN. Raises ConfigError when it is missing or its file is too open."""
        if self.file is not None:
            return _read_secret_file(self.file, "token.pin_file")
        if self.env is not None:
            value = os.environ.get(self.env)
            if not value:
                raise ConfigError(f"the PIN environment variable {self.env} is not set or empty")
            return value
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"token.pin_credential = {self.credential!r} needs CREDENTIALS_DIRECTORY "
                "(run under systemd with LoadCredential=)"
            )
        return _read_secret_file(Path(directory) / str(self.credential), "token.pin_credential")


def _read_secret_file(path: Path, key: str) -> str:
    try:
        st = path.stat()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{key}: {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run 'chmod 600 {path}'"
        )
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        # Not the decoder's message: it quotes a byte of the secret.
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{key}: {path} is empty")
    return value


@dataclass(frozen=True)
class TokenConfig:
    """Which PKCS#11 module and token, and how to use it."""

    #: Path of the PKCS#11 module (.so). For SoftHSM2 use p11-kit-proxy.so (thread-safe).
    module: Path
    #: Token label to select (exactly one of label and serial, or a PKCS#11 URI).
    label: str | None
    serial: str | None
    pin: PinSource
    #: Environment variables set before the module loads (e.g. SOFTHSM2_CONF).
    environment: Mapping[str, str]
    #: "parallel": sessions used from many threads at once (module must be thread-safe);
    #: "serialized": every PKCS#11 call behind one lock.
    threading: ThreadingMode
    #: Sessions in the pool (besides the login session), in each serving process.
    sessions: int
    #: Seconds a call waits for a free session before RESOURCE_EXHAUSTED.
    session_wait_seconds: float

    def describe_token(self) -> str:
        return f"label {self.label!r}" if self.label is not None else f"serial {self.serial!r}"


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS. With ``client_ca`` set, clients must present a certificate it signed."""

    cert: Path
    key: Path
    client_ca: Path | None
    #: Client certificate names (subject CN or a subjectAltName) allowed to call KeyAdmin;
    #: empty: every client the CA admits.
    admin_clients: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ServerConfig:
    #: host:port to listen on; port 0 picks a free port (printed at start-up).
    listen: str
    #: Threads serving calls, in each serving process.
    workers: int
    #: Calls admitted at once by each serving process; beyond that callers get
    #: RESOURCE_EXHAUSTED.
    max_concurrent_calls: int
    #: Seconds SIGTERM waits for in-flight calls before cancelling them.
    grace_seconds: float
    tls: TlsConfig | None
    #: Serve gRPC server reflection (for grpcurl and friends).
    reflection: bool
    #: Serving processes sharing the port (SO_REUSEPORT), each with its own token login,
    #: session pool and threads; 1 serves from the main process. See docs/adr/0003.
    processes: int = 1
    #: Serve the KeyAdmin service (create, rotate, import, destroy keys) on this daemon.
    key_admin: bool = True


@dataclass(frozen=True)
class KeyRingConfig:
    #: Seconds between re-reads of the key ring from the token (changes made by other
    #: processes are seen within this bound).
    refresh_seconds: float
    #: Minimum delay for ScheduleKeyVersionDestruction.
    min_destruction_delay_seconds: float


@dataclass(frozen=True)
class KeyOptions:
    """Per-key exceptions to the defaults, under [keys.NAME]."""

    #: Use the key even if the token reports its private key as extractable.
    allow_extractable: bool = False
    #: Allow PKCS#1 v1.5 decryption (with implicit rejection) for unwrap.
    allow_pkcs1v15_unwrap: bool = False


@dataclass(frozen=True)
class Config:
    path: Path
    token: TokenConfig
    server: ServerConfig
    keyring: KeyRingConfig
    keys: Mapping[str, KeyOptions] = field(default_factory=dict)
    log_level: str = "INFO"
    audit: audit_config.AuditConfig = field(default_factory=audit_config.AuditConfig)

    def key_options(self, name: str) -> KeyOptions:
        return self.keys.get(name, KeyOptions())


class _Table:
    """A TOML table that remembers its dotted name, for error messages."""

    def __init__(self, path: Path, name: str, data: Mapping[str, Any]) -> None:
        self.path, self.name, self.data = path, name, data
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self._key(key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, allowed: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(key, f"got {value!r}; allowed: {allowed}")
        return value

    def table(self, key: str) -> _Table:
        self.used.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, "must be a table")
        return _Table(self.path, self._key(key), value)

    def path_value(self, key: str) -> Path | None:
        """A file path; relative to the config file's directory; ``${MULTIARCH}`` stands for
        Debian's multiarch directory name (for PKCS#11 modules under /usr/lib/<triplet>/)."""
        value = self.get(key, str, None, "a file path")
        if value is None:
            return None
        p = Path(value.replace("${MULTIARCH}", MULTIARCH))
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def required_path(self, key: str) -> Path:
        value = self.path_value(key)
        if value is None:
            raise self.error(key, "is required (a file path)")
        return value

    def positive(self, key: str, kind: type, default: Any, maximum: float) -> Any:
        value = self.get(key, kind, default, f"a number from 1 to {maximum:g}")
        if not 0 < value <= maximum:
            raise self.error(
                key, f"got {value!r}; allowed: a number above 0 and at most {maximum:g}"
            )
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(
                unknown[0], f"unknown key; allowed here: {', '.join(sorted(self.used))}"
            )


def _parse_uri(table: _Table, uri: str) -> tuple[str | None, str | None]:
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


def _token(root: _Table) -> TokenConfig:
    t = root.table("token")
    module = t.required_path("module")
    label = t.get("label", str, None, "the token label")
    serial = t.get("serial", str, None, "the token serial number")
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
    default_threading = "parallel" if module.name in LOCKING_PROXIES else "serialized"
    threading = t.get("threading", str, default_threading, '"parallel" or "serialized"')
    if threading not in ("parallel", "serialized"):
        raise t.error("threading", f'got {threading!r}; allowed: "parallel" or "serialized"')
    sessions = t.positive("sessions", int, DEFAULT_SESSIONS, 256)
    wait = t.positive("session_wait_seconds", float, 5.0, 600)
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
    )


#: token.sessions when not set: per serving process. Two per process measured best on the
#: 2-core reference machine with SoftHSM2 (docs/performance.md); an HSM that answers over the
#: network wants about its own parallelism divided by server.processes.
DEFAULT_SESSIONS = 2


def _server(root: _Table, sessions: int) -> ServerConfig:
    s = root.table("server")
    listen = s.get("listen", str, "127.0.0.1:50051", '"HOST:PORT"')
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise s.error("listen", f'got {listen!r}; allowed: "HOST:PORT" such as "127.0.0.1:50051"')
    # Default: two threads per session, so a call can be read and answered while its
    # neighbour signs; more only queue on the GIL (docs/performance.md).
    workers = s.positive("workers", int, 2 * sessions, 1024)
    max_calls = s.positive("max_concurrent_calls", int, 256, 100_000)
    grace = s.positive("grace_seconds", float, 10.0, 3600)
    reflection = s.get("reflection", bool, True, "true or false")
    processes = _processes(s)
    key_admin = s.get("key_admin", bool, True, "true or false")
    tls: TlsConfig | None = None
    s.used.add("tls")  # listed among the allowed keys even when absent
    if "tls" in s.data:
        tt = s.table("tls")
        admin_clients = tt.get("admin_clients", list, [], "a list of client certificate names")
        if not all(isinstance(n, str) and n for n in admin_clients):
            raise tt.error(
                "admin_clients", f"got {admin_clients!r}; allowed: non-empty names (strings)"
            )
        tls = TlsConfig(
            cert=tt.required_path("cert"),
            key=tt.required_path("key"),
            client_ca=tt.path_value("client_ca"),
            admin_clients=frozenset(admin_clients),
        )
        if tls.admin_clients and tls.client_ca is None:
            raise tt.error("admin_clients", "needs client_ca: names come from client certificates")
        tt.finish()
    s.finish()
    return ServerConfig(
        listen, workers, max_calls, grace, tls, reflection, processes, key_admin=key_admin
    )


#: Upper bound for server.processes: each process logs in and opens its own sessions.
MAX_PROCESSES = 64
#: "auto" stops here: past a few processes an HSM's own limit dominates, while every process
#: costs the token a login and sessions. Larger machines set a number.
MAX_AUTO_PROCESSES = 8


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (containers: docker --cpus, Kubernetes limits.cpu)."""
    try:  # cgroup v2
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), further limited by a
    cgroup CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return cpus


def _processes(s: _Table) -> int:
    allowed = (
        f'"auto" (one per CPU, at most {MAX_AUTO_PROCESSES}) or a number from 1 to {MAX_PROCESSES}'
    )
    value = s.get("processes", (int, str), "auto", allowed)
    if value == "auto":
        return min(available_cpus(), MAX_AUTO_PROCESSES)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_PROCESSES:
        raise s.error("processes", f"got {value!r}; allowed: {allowed}")
    return value


def _keyring(root: _Table) -> KeyRingConfig:
    k = root.table("keyring")
    refresh = k.positive("refresh_seconds", float, 2.0, 3600)
    min_delay = k.get("min_destruction_delay_hours", float, 24.0, "hours, a number >= 0")
    if min_delay < 0:
        raise k.error("min_destruction_delay_hours", f"got {min_delay!r}; allowed: a number >= 0")
    k.finish()
    return KeyRingConfig(refresh_seconds=refresh, min_destruction_delay_seconds=min_delay * 3600)


def _keys(root: _Table) -> dict[str, KeyOptions]:
    keys = root.table("keys")
    out: dict[str, KeyOptions] = {}
    for name in list(keys.data):
        kt = keys.table(name)
        out[name] = KeyOptions(
            allow_extractable=kt.get("allow_extractable", bool, False, "true or false"),
            allow_pkcs1v15_unwrap=kt.get("allow_pkcs1v15_unwrap", bool, False, "true or false"),
        )
        kt.finish()
    return out


def load(path: Path) -> Config:
    """Reads and validates a config file. Raises ConfigError naming the file and key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    root = _Table(path.resolve(), "", raw)
    level = root.get("log_level", str, "INFO", "DEBUG, INFO, WARNING or ERROR").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise root.error("log_level", f"got {level!r}; allowed: DEBUG, INFO, WARNING or ERROR")
    token = _token(root)
    config = Config(
        path=root.path,
        token=token,
        server=_server(root, token.sessions),
        keyring=_keyring(root),
        keys=_keys(root),
        log_level=level,
        audit=audit_config.parse(root.table("audit").data, root.path),
    )
    root.finish()
    return config
