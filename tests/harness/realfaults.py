"""Real token faults under a running daemon, for tests/integration/test_token_faults_real.py
(the injected ones are tests/harness/faults.py): the commands that run the daemon without
root's file-permission override or with few descriptors, the token directory to break, a
bounded signing load that records every answer, a health watcher, and the checks that turn
what they saw into a list of plain problems.

Nothing here fakes the token: the faults are made on the real SoftHSM2 files (modes, renames,
deletion), the real descriptor limit and the real PIN.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness.paths import HSMSIGND
from tests.harness.tokens import TokenDir

#: Runs a command without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (DESIGN fact 10): root
#: then obeys file modes. Dropping them from the bounding set keeps them out of the permitted
#: set after exec (the inheritable set is cleared as well, so nothing brings them back).
WITHOUT_DAC_OVERRIDE: tuple[str, ...] = (
    "setpriv",
    "--bounding-set=-dac_override,-dac_read_search",
    "--inh-caps=-dac_override,-dac_read_search",
)

#: The services whose health the fault tests follow.
HEALTH_SERVICES = ("", "hsmsign.v1.Signer")
SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"


def without_dac_override() -> tuple[str, ...]:
    """The ``start_daemon`` command that runs hsmsignd under WITHOUT_DAC_OVERRIDE (setpriv
    execs it: the pid is the daemon's)."""
    return (*WITHOUT_DAC_OVERRIDE, HSMSIGND)


def descriptor_limit(n: int) -> tuple[str, ...]:
    """The ``start_daemon`` command that runs hsmsignd with RLIMIT_NOFILE ``n`` (soft and
    hard; prlimit execs it)."""
    return ("prlimit", f"--nofile={n}:{n}", HSMSIGND)


def cannot_drop_dac_override() -> str | None:
    """Why this machine cannot run a process that obeys file modes as root, or None if it can
    (checked for real: a process under WITHOUT_DAC_OVERRIDE tries to list a mode-000
    directory)."""
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        closed = Path(tmp) / "closed"
        closed.mkdir(mode=0)
        try:
            r = subprocess.run(
                [*WITHOUT_DAC_OVERRIDE, "ls", str(closed)],
                capture_output=True,
                timeout=30,
            )
        finally:
            closed.chmod(0o700)
    if r.returncode == 0:
        return "a process under setpriv without CAP_DAC_OVERRIDE still read a mode-000 directory"
    return None


def token_store(token: TokenDir) -> Path:
    """The directory where SoftHSM2 keeps ``token``'s objects (``tokens/<uuid>``).

    Raises AssertionError unless there is exactly one."""
    stores = [p for p in (token.path / "tokens").iterdir() if p.is_dir()]
    if len(stores) != 1:
        raise AssertionError(f"expected one SoftHSM2 token directory, found {stores}")
    return stores[0]


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raises TimeoutError in the main thread if the block runs longer than ``seconds``: a
    bound for a whole test without pytest-timeout (the block must run in the main thread)."""

    def expired(_signum: int, _frame: FrameType | None) -> None:
        raise TimeoutError(f"{what} took longer than {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def public_key_from_pem(pem: str) -> rsa.RSAPublicKey:
    """An RSA public key from an SPKI PEM. Raises TypeError if it is not RSA."""
    key = serialization.load_pem_public_key(pem.encode())
    if not isinstance(key, rsa.RSAPublicKey):
        raise TypeError(f"not an RSA public key: {type(key).__name__}")
    return key


# -- the signing load ------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One SignDigest call as the caller saw it (monotonic times)."""

    started: float
    ended: float
    code: grpc.StatusCode
    details: str = ""
    signature: bytes = b""
    version: int = 0
    fingerprint: str = ""

    def describe(self) -> str:
        what = f"{self.code.name}"
        if self.details:
            what += f" {self.details!r}"
        if self.code == grpc.StatusCode.OK:
            what += f" (version {self.version}, sha256:{self.fingerprint[:12]})"
        return what


class SignLoad:
    """A few threads, each on its own connection, calling SignDigest in a bounded loop with a
    pause between calls and a deadline on each; every answer is kept as an Outcome."""

    def __init__(
        self,
        address: str,
        digest: bytes,
        *,
        key: str = "demo",
        threads: int = 2,
        pause: float = 0.05,
        deadline: float = 15.0,
        max_calls: int = 20_000,
    ) -> None:
        self.address, self.digest, self.key = address, digest, key
        self._threads = [
            threading.Thread(target=self._loop, name=f"sign-load-{i}", daemon=True)
            for i in range(threads)
        ]
        self._pause, self._deadline, self._max_calls = pause, deadline, max_calls
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._outcomes: list[Outcome] = []

    def __enter__(self) -> SignLoad:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self._deadline + 10)

    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    def _loop(self) -> None:
        request = pb.SignDigestRequest(
            key=pb.KeyRef(name=self.key),
            digest=self.digest,
            algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
        )
        # Its own subchannel: with several serving processes the threads' connections may
        # land on different ones.
        with grpc.insecure_channel(
            self.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = pb_grpc.SignerStub(channel)
            for _ in range(self._max_calls):
                if self._stop.is_set():
                    return
                started = time.monotonic()
                try:
                    resp = stub.SignDigest(request, timeout=self._deadline)
                    outcome = Outcome(
                        started,
                        time.monotonic(),
                        grpc.StatusCode.OK,
                        signature=resp.signature,
                        version=resp.key.version,
                        fingerprint=resp.key.fingerprint,
                    )
                except grpc.RpcError as e:
                    outcome = Outcome(started, time.monotonic(), e.code(), e.details() or "")
                with self._lock:
                    self._outcomes.append(outcome)
                self._stop.wait(self._pause)


# -- health ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthSample:
    at: float
    service: str
    #: SERVING, NOT_SERVING, SERVICE_UNKNOWN, or the gRPC status of a failed check.
    status: str


class HealthWatch:
    """Asks grpc.health.v1 about HEALTH_SERVICES every ``interval`` seconds on one connection
    of its own, in a thread, and keeps every answer."""

    def __init__(self, address: str, interval: float = 0.25, deadline: float = 5.0) -> None:
        self.address, self._interval, self._deadline = address, interval, deadline
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[HealthSample] = []
        self._thread = threading.Thread(target=self._loop, name="health-watch", daemon=True)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(self._deadline + 10)

    def samples(self) -> list[HealthSample]:
        with self._lock:
            return list(self._samples)

    def _loop(self) -> None:
        with grpc.insecure_channel(
            self.address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.is_set():
                for service in HEALTH_SERVICES:
                    try:
                        r = stub.Check(
                            health_pb2.HealthCheckRequest(service=service), timeout=self._deadline
                        )
                        status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                    except grpc.RpcError as e:
                        status = e.code().name
                    with self._lock:
                        self._samples.append(HealthSample(time.monotonic(), service, status))
                self._stop.wait(self._interval)


# -- what the caller saw, checked ---------------------------------------------------------------


@dataclass
class Findings:
    """Problems found, each one line; the test asserts there are none at its end, so that one
    run reports every way the daemon went wrong, not only the first."""

    problems: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        self.problems.append(problem)

    def report(self) -> str:
        return "\n".join(f"- {p}" for p in self.problems)


def signer_of(outcome: Outcome, digest: bytes, keys: Mapping[str, rsa.RSAPublicKey]) -> str | None:
    """Which of ``keys`` (by label) made the OK outcome's signature, or None if none did."""
    for label, public in keys.items():
        try:
            public.verify(outcome.signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        except InvalidSignature:
            continue
        return label
    return None


def _summary(outcomes: Sequence[Outcome], limit: int = 4) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.describe()] = counts.get(o.describe(), 0) + 1
    parts = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{n}x {what}" for what, n in parts[:limit])
    return text + (f", and {len(parts) - limit} other answers" if len(parts) > limit else "")


def check_answers(
    found: Findings,
    outcomes: Sequence[Outcome],
    digest: bytes,
    keys: Mapping[str, rsa.RSAPublicKey],
    *,
    gone_after: Mapping[str, float] | None = None,
    allowed: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE}),
) -> None:
    """No wrong answer in ``outcomes``: every OK signature verifies with one of ``keys``, and
    not with a key of ``gone_after`` for a call started after that key vanished; no
    NOT_FOUND (the key exists); every refusal has a status in ``allowed``."""
    gone_after = gone_after or {}
    unverified = [
        o for o in outcomes if o.code == grpc.StatusCode.OK and not signer_of(o, digest, keys)
    ]
    if unverified:
        found.add(f"{len(unverified)} OK signatures verify with no known key")
    for label, since in gone_after.items():
        stale = [
            o
            for o in outcomes
            if o.code == grpc.StatusCode.OK
            and o.started > since
            and signer_of(o, digest, keys) == label
        ]
        if stale:
            found.add(f"{len(stale)} calls started after key {label!r} vanished were signed by it")
    not_found = [o for o in outcomes if o.code == grpc.StatusCode.NOT_FOUND]
    if not_found:
        found.add(
            f"{len(not_found)} NOT_FOUND answers for a key that exists: {_summary(not_found)}"
        )
    other = [
        o
        for o in outcomes
        if o.code not in allowed | {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}
    ]
    if other:
        found.add(f"{len(other)} answers with an unexpected status: {_summary(other)}")


def check_fault_window(
    found: Findings,
    outcomes: Sequence[Outcome],
    health: Sequence[HealthSample],
    start: float,
    end: float,
) -> None:
    """While the fault lasts (calls started in [start, end) and ended before ``end``): the fault
    bites (calls were made and none succeeded), every call is UNAVAILABLE, and every health
    answer for each of HEALTH_SERVICES is NOT_SERVING."""
    during = [o for o in outcomes if start <= o.started and o.ended < end]
    if not during:
        found.add("no call completed while the fault lasted (the load stalled)")
    elif any(o.code == grpc.StatusCode.OK for o in during):
        found.add(
            f"calls succeeded while the fault lasted: the fault did not bite ({_summary(during)})"
        )
    else:
        wrong = [o for o in during if o.code != grpc.StatusCode.UNAVAILABLE]
        if wrong:
            found.add(f"while the fault lasted, not UNAVAILABLE: {_summary(wrong)}")
    for service in HEALTH_SERVICES:
        seen = [h.status for h in health if h.service == service and start <= h.at < end]
        if not seen:
            found.add(f"no health answer for service {service!r} while the fault lasted")
        elif any(s != NOT_SERVING for s in seen):
            counts = {s: seen.count(s) for s in sorted(set(seen))}
            wrong_at = [
                f"{h.at - start:+.2f}s/{h.at - end:+.2f}s"
                for h in health
                if h.service == service and start <= h.at < end and h.status != NOT_SERVING
            ]
            found.add(
                f"health of {service!r} while the fault lasted: {counts}, not NOT_SERVING "
                f"(at {', '.join(wrong_at[:8])} from the window's start/end)"
            )


def healthy_since(health: Sequence[HealthSample], since: float) -> bool:
    """Whether the latest answer for each of HEALTH_SERVICES after ``since`` is SERVING."""
    for service in HEALTH_SERVICES:
        seen = [h for h in health if h.service == service and h.at >= since]
        if not seen or seen[-1].status != SERVING:
            return False
    return True


def wait_recovered(load: SignLoad, watch: HealthWatch, since: float, bound: float) -> float | None:
    """Waits up to ``bound`` seconds for calls to succeed again and health to say SERVING
    for every service, both in answers given after ``since``. Returns the monotonic time
    it was first seen, or None."""
    deadline = since + bound
    while time.monotonic() < deadline:
        now = time.monotonic()
        recent = [o for o in load.outcomes() if o.started >= since]
        if (
            recent
            and recent[-1].code == grpc.StatusCode.OK
            and healthy_since(watch.samples(), since)
        ):
            return now
        time.sleep(0.2)
    return None


def check_steady(
    found: Findings,
    outcomes: Sequence[Outcome],
    health: Sequence[HealthSample],
    start: float,
    end: float,
) -> None:
    """After recovery (answers in [start, end)): every call OK, every health answer SERVING."""
    after = [o for o in outcomes if start <= o.started and o.ended < end]
    if not after:
        found.add("no call completed after recovery")
    elif any(o.code != grpc.StatusCode.OK for o in after):
        found.add(f"after recovery not every call is OK: {_summary(after)}")
    off = [h for h in health if start <= h.at < end and h.status != SERVING]
    if off:
        found.add(f"after recovery health said {sorted({h.status for h in off})}")


def check_log(found: Findings, log: str, secrets: Sequence[str]) -> None:
    """The daemon's log has no traceback and none of ``secrets`` (PINs)."""
    if "Traceback" in log:
        start = log.index("Traceback")
        found.add(f"traceback in the daemon's log: {log[start : start + 300]!r}")
    for secret in secrets:
        if secret and secret in log:
            found.add("a PIN appears in the daemon's log")


class ChildWatch:
    """Records, every ``interval`` seconds in a thread, the pids of ``parent``'s children (its
    serving processes): how many the supervisor started, including ones that died at once."""

    def __init__(self, parent: int, interval: float = 0.05) -> None:
        self.parent, self._interval = parent, interval
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="child-watch", daemon=True)

    def __enter__(self) -> ChildWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _children(self) -> set[int]:
        found: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The field after the parenthesised command name is the state, then the ppid.
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.parent:
                found.add(int(entry.name))
        return found

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.seen |= self._children()
            self._stop.wait(self._interval)
