"""Real token faults under a running daemon (issue 16), each under a light, bounded signing
load on loopback: the token directory made unreadable, moved away, deleted and re-initialised;
descriptors exhausted; the PIN changed. For each: no wrong answer ever (every OK signature
verifies, never NOT_FOUND for a key that exists, never an empty key list), UNAVAILABLE and
health NOT_SERVING while the fault lasts, and calls and health back by themselves, without a
restart, within RECOVERY_SECONDS. A refused PIN instead stops the daemon with exit 77, once,
with no restart loop.

Each test runs its own token and daemon, and reports every problem it saw at its end."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness.daemons import Daemon, hsmsignd, start_daemon
from tests.harness.paths import SOFTHSM_MODULE
from tests.harness.realfaults import (
    ChildWatch,
    Findings,
    HealthSample,
    HealthWatch,
    Outcome,
    SignLoad,
    cannot_drop_dac_override,
    check_answers,
    check_fault_window,
    check_log,
    check_steady,
    descriptor_limit,
    public_key_from_pem,
    signer_of,
    time_limit,
    token_store,
    wait_recovered,
    without_dac_override,
)
from tests.harness.tokens import TokenDir, make_token, write_config

DIGEST = hashlib.sha256(b"hsmsign token faults").digest()
#: keyring.refresh_seconds of the daemons here.
REFRESH_SECONDS = 1.0
#: How long after the fault starts the daemon may take to notice it: two refreshes, and
#: slack for a loaded 2-core machine.
DETECT_SECONDS = 2 * REFRESH_SECONDS + 3
#: How long a fault lasts.
FAULT_SECONDS = 12.0
#: Calls and health must be back within this after the fault ends.
RECOVERY_SECONDS = 30.0
#: How long the answers after recovery are watched.
STEADY_SECONDS = 3.0
#: The bound on a whole test.
TEST_SECONDS = 240.0


@dataclass
class FaultToken:
    """A test's own token with a sign key 'demo', its config, and demo's public key."""

    token: TokenDir
    config: Path
    demo: rsa.RSAPublicKey

    @property
    def so_pin(self) -> str:
        return (self.token.path / "so.pin").read_text()


def _create_key(config: Path, name: str) -> rsa.RSAPublicKey:
    out = hsmsignd(config, "keys", "create", name, "--json").stdout
    return public_key_from_pem(str(json.loads(out)["spki_pem"]))


def _fault_token(root: Path, processes: int = 1) -> FaultToken:
    token = make_token(root / "token", "hsmsign-faults")
    config = write_config(
        root / "hsmsignd.toml",
        token,
        extra=(
            f"[server]\nprocesses = {processes}\n[keyring]\nrefresh_seconds = {REFRESH_SECONDS}\n"
        ),
    )
    return FaultToken(token, config, _create_key(config, "demo"))


@pytest.fixture()
def bounded() -> Iterator[None]:
    with time_limit(TEST_SECONDS, "this fault test"):
        yield


def _wait_serving(load: SignLoad, watch: HealthWatch, bound: float = 30.0) -> None:
    """Before the fault: the daemon signs and says SERVING. Raises AssertionError if not."""
    since = time.monotonic()
    if wait_recovered(load, watch, since, bound) is None:
        raise AssertionError(
            f"the daemon did not sign and say SERVING within {bound:g}s of starting: "
            f"{[o.describe() for o in load.outcomes()[-3:]]}"
        )


@dataclass
class Timeline:
    """What one fault run saw: every answer and health sample, and when things happened."""

    outcomes: list[Outcome]
    health: list[HealthSample]
    fault_start: float
    fault_end: float
    recovered: float | None
    steady_end: float
    #: What ListKeys answered once the fault had been seen: a status name, or the key names.
    listed_during: str | list[str]


def _list_keys(stub: pb_grpc.KeyAdminStub) -> str | list[str]:
    try:
        r = stub.ListKeys(pb.ListKeysRequest(), timeout=15)
    except grpc.RpcError as e:
        return str(e.code().name)
    return sorted(k.name for k in r.keys)


def _check_listed_during(found: Findings, run: Timeline, names: set[str]) -> None:
    """ListKeys while the fault lasts: UNAVAILABLE, or (from what it knew) every key; never an
    empty or short list."""
    listed = run.listed_during
    if isinstance(listed, list):
        if not names <= set(listed):
            found.add(f"ListKeys while the fault lasted answered OK with {listed}")
    elif listed != grpc.StatusCode.UNAVAILABLE.name:
        found.add(f"ListKeys while the fault lasted answered {listed}, not UNAVAILABLE")


def _through_fault(
    d: Daemon,
    apply: Callable[[], None],
    restore: Callable[[], None],
    *,
    hold: float = FAULT_SECONDS,
    threads: int = 2,
) -> Timeline:
    """Runs the load and the health watch on ``d``; applies the fault, holds it ``hold``
    seconds, restores it (always), then waits for recovery and watches STEADY_SECONDS more."""
    with (
        HealthWatch(d.address) as watch,
        SignLoad(d.address, DIGEST, threads=threads) as load,
        # Opened before the fault: a fault that takes descriptors away refuses new ones.
        grpc.insecure_channel(d.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch,
    ):
        _wait_serving(load, watch)
        admin = pb_grpc.KeyAdminStub(ch)
        _list_keys(admin)
        try:
            apply()
            fault_start = time.monotonic()
            time.sleep(DETECT_SECONDS)
            listed_during = _list_keys(admin)
            time.sleep(max(0.0, fault_start + hold - time.monotonic()))
            fault_end = time.monotonic()
        finally:
            restore()
        recovered = wait_recovered(load, watch, time.monotonic(), RECOVERY_SECONDS)
        if recovered is not None:
            time.sleep(STEADY_SECONDS)
        steady_end = time.monotonic()
    return Timeline(
        load.outcomes(),
        watch.samples(),
        fault_start,
        fault_end,
        recovered,
        steady_end,
        listed_during,
    )


def _workers(d: Daemon) -> list[int]:
    ready = json.loads((d.tmp / "ready.json").read_text())
    return [int(p) for p in ready.get("workers", [])]


@dataclass(frozen=True)
class _Processes:
    """The daemon's pid and its serving processes' pids (ready file)."""

    pid: int
    workers: tuple[int, ...]

    @classmethod
    def of(cls, d: Daemon) -> _Processes:
        return cls(d.proc.pid, tuple(_workers(d)))


def _check_recovery(found: Findings, run: Timeline, d: Daemon, started: _Processes) -> None:
    """Calls and health came back within RECOVERY_SECONDS and stayed, and no process of the
    daemon was replaced: a restart is not a recovery."""
    if run.recovered is None:
        found.add(
            f"no recovery within {RECOVERY_SECONDS:g}s after the fault ended: last answers "
            f"{[o.describe() for o in run.outcomes[-2:]]}, health "
            f"{[h.status for h in run.health[-2:]]}"
        )
    else:
        # Half a second for calls that were already on their way back.
        check_steady(found, run.outcomes, run.health, run.recovered + 0.5, run.steady_end)
    if d.proc.poll() is not None:
        found.add(f"the daemon exited ({d.proc.returncode}) instead of recovering")
    elif _Processes.of(d) != started:
        found.add(
            f"serving processes were replaced ({started.workers} became {_Processes.of(d).workers})"
            ": restarted, not recovered"
        )


def _listed_keys(d: Daemon) -> set[str]:
    """Key names from ``hsmsign keys list --json`` through the daemon."""
    r = d.hsmsign("keys", "list", "--json", check=False)
    if r.returncode != 0:
        return set()
    return {str(v["name"]) for v in json.loads(r.stdout or b"[]")}


def _check_keys_listed(found: Findings, d: Daemon, names: set[str]) -> None:
    listed = _listed_keys(d)
    if not names <= listed:
        found.add(f"`hsmsign keys list` through the daemon lists {sorted(listed)}, not {names}")


# -- 1, 2: the token directory unreadable, or moved away ---------------------------------------


def _away(token: TokenDir, store: Path) -> Path:
    """Where the token's directory is moved: outside SoftHSM2's tokendir, which takes every
    directory in it for a token (a rename inside it only renames the token)."""
    return token.path / (store.name + ".away")


def test_unreadable_token_directory_gives_unavailable_then_recovers(
    tmp_path: Path, bounded: None
) -> None:
    why = cannot_drop_dac_override()
    if why:
        pytest.skip(f"cannot run the daemon without root's permission override: {why}")
    ft = _fault_token(tmp_path)
    store = token_store(ft.token)
    d = start_daemon(ft.config, tmp_path / "d", command=without_dac_override())
    started = _Processes.of(d)
    try:
        run = _through_fault(d, lambda: store.chmod(0), lambda: store.chmod(0o700))
        found = Findings()
        check_answers(found, run.outcomes, DIGEST, {"demo": ft.demo})
        _check_listed_during(found, run, {"demo"})
        check_fault_window(
            found, run.outcomes, run.health, run.fault_start + DETECT_SECONDS, run.fault_end
        )
        _check_recovery(found, run, d, started)
        _check_keys_listed(found, d, {"demo"})
    finally:
        d.stop()
    check_log(found, d.log(), [ft.token.pin])
    assert not found.problems, f"token directory unreadable for {FAULT_SECONDS:g}s:\n" + (
        found.report()
    )


def test_token_directory_moved_away_and_back_recovers(tmp_path: Path, bounded: None) -> None:
    ft = _fault_token(tmp_path)
    store = token_store(ft.token)
    away = _away(ft.token, store)
    d = start_daemon(ft.config, tmp_path / "d")
    started = _Processes.of(d)
    try:

        def restore() -> None:
            if away.exists():
                away.rename(store)

        def move_away() -> None:
            store.rename(away)

        run = _through_fault(d, move_away, restore)
        found = Findings()
        check_answers(found, run.outcomes, DIGEST, {"demo": ft.demo})
        _check_listed_during(found, run, {"demo"})
        check_fault_window(
            found, run.outcomes, run.health, run.fault_start + DETECT_SECONDS, run.fault_end
        )
        _check_recovery(found, run, d, started)
        _check_keys_listed(found, d, {"demo"})
    finally:
        d.stop()
    check_log(found, d.log(), [ft.token.pin])
    assert not found.problems, f"token directory moved away for {FAULT_SECONDS:g}s:\n" + (
        found.report()
    )


# -- 3: the token deleted and re-initialised under the daemon ---------------------------------


def _token_tool(token: TokenDir, program: str, *args: str) -> None:
    """Runs softhsm2-util or pkcs11-tool on ``token``'s SoftHSM2 config. Raises AssertionError
    (with its output) if it fails."""
    command = (
        [program, *args]
        if program == "softhsm2-util"
        else [program, "--module", SOFTHSM_MODULE, *args]
    )
    r = subprocess.run(command, env=token.env(), capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AssertionError(f"{program} {args[0]} failed: {r.stdout}{r.stderr}")


def _sign_on_new_connection(address: str) -> Outcome:
    """One call on a connection of its own: with several serving processes the kernel picks
    which one answers."""
    request = pb.SignDigestRequest(
        key=pb.KeyRef(name="demo"),
        digest=DIGEST,
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
    )
    started = time.monotonic()
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        try:
            r = pb_grpc.SignerStub(ch).SignDigest(request, timeout=15)
        except grpc.RpcError as e:
            return Outcome(started, time.monotonic(), e.code(), e.details() or "")
    return Outcome(
        started,
        time.monotonic(),
        grpc.StatusCode.OK,
        signature=r.signature,
        version=r.key.version,
        fingerprint=r.key.fingerprint,
    )


def _check_every_connection_answers_new(
    found: Findings, d: Daemon, keys: dict[str, rsa.RSAPublicKey], when: str
) -> None:
    """16 calls on new connections (spread over the serving processes): all OK, all signed
    by the re-created key."""
    answers = [_sign_on_new_connection(d.address) for _ in range(16)]
    signers = [
        signer_of(o, DIGEST, keys) if o.code == grpc.StatusCode.OK else None for o in answers
    ]
    if any(s != "new" for s in signers):
        seen = sorted({f"{o.describe()} signer={s}" for o, s in zip(answers, signers, strict=True)})
        found.add(f"{when}, calls on new connections did not all sign with the new key: {seen}")


@pytest.mark.parametrize("processes", [1, 2])
def test_token_deleted_and_reinitialised_serves_the_new_key(
    tmp_path: Path, bounded: None, processes: int
) -> None:
    """The token is deleted, then set up again with the same label in two steps, as HSM tools
    do: the token first (its user PIN not yet set: a token being set up, not a refused PIN),
    then the same user PIN; then 'demo' is created again. The key objects are new: 'demo'
    must resolve to the re-created key, no call started after the deletion may be signed by
    the vanished key, and every serving process must give the same answer, also after one of
    them is replaced. NOT_FOUND is right only while the re-initialised token, readable and
    logged in, truly holds no 'demo' (and until a refresh after its re-creation)."""
    ft = _fault_token(tmp_path, processes)
    label, pin, so_pin = ft.token.label, ft.token.pin, ft.so_pin
    d = start_daemon(ft.config, tmp_path / "d")
    started = _Processes.of(d)
    keys: dict[str, rsa.RSAPublicKey] = {"old": ft.demo}
    marks: dict[str, float] = {}

    def delete() -> None:
        _token_tool(ft.token, "softhsm2-util", "--delete-token", "--token", label)

    def reinitialise() -> None:
        _token_tool(ft.token, "pkcs11-tool", "--init-token", "--label", label, "--so-pin", so_pin)
        time.sleep(DETECT_SECONDS)
        _token_tool(
            ft.token,
            "pkcs11-tool",
            "--token-label",
            label,
            "--login",
            "--login-type",
            "so",
            "--so-pin",
            so_pin,
            "--init-pin",
            "--new-pin",
            pin,
        )
        marks["usable"] = time.monotonic()
        time.sleep(DETECT_SECONDS)
        keys["new"] = _create_key(ft.config, "demo")
        marks["recreated"] = time.monotonic()

    try:
        run = _through_fault(d, delete, reinitialise, threads=2 * processes)
        found = Findings()
        empty_from = marks.get("usable", float("inf"))
        empty_until = marks.get("recreated", float("inf")) + DETECT_SECONDS
        truly_absent = [
            o
            for o in run.outcomes
            if o.code == grpc.StatusCode.NOT_FOUND and empty_from <= o.started < empty_until
        ]
        check_answers(
            found,
            [o for o in run.outcomes if o not in truly_absent],
            DIGEST,
            keys,
            gone_after={"old": run.fault_start},
        )
        _check_listed_during(found, run, {"demo"})
        # The fault lasts until the re-initialised token has its user PIN: from then on it is
        # a usable token that holds no key yet, which a process may rightly report SERVING
        # (and answer NOT_FOUND for, above) before the key is created again.
        check_fault_window(
            found,
            run.outcomes,
            run.health,
            run.fault_start + DETECT_SECONDS,
            min(run.fault_end, marks.get("usable", run.fault_end)),
        )
        _check_recovery(found, run, d, started)
        # Only a daemon that recovered can be asked which key it signs with now.
        if "new" in keys and run.recovered is not None and d.proc.poll() is None:
            _check_every_connection_answers_new(found, d, keys, "after recovery")
            if processes > 1:
                before = _workers(d)
                os.kill(before[0], signal.SIGKILL)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and (
                    len(_workers(d)) != processes or before[0] in _workers(d)
                ):
                    time.sleep(0.2)
                _check_every_connection_answers_new(
                    found, d, keys, "after one serving process was replaced"
                )
        _check_keys_listed(found, d, {"demo"})
    finally:
        d.stop()
    check_log(found, d.log(), [pin, so_pin])
    assert not found.problems, (
        f"token deleted and re-initialised ({processes} serving processes):\n" + found.report()
    )


# -- 4: descriptors exhausted ------------------------------------------------------------------

#: RLIMIT_NOFILE of the daemon in the descriptor test.
DESCRIPTOR_LIMIT = 256


def _open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_descriptors_exhausted_leave_the_key_ring_whole(tmp_path: Path, bounded: None) -> None:
    """Idle TCP connections use up the daemon's descriptors while the key ring refreshes (and
    another admin changes it offline, so that a full read falls in the fault); once they
    close, the ring is whole, `keys list` lists every key and health is SERVING."""
    ft = _fault_token(tmp_path)
    d = start_daemon(ft.config, tmp_path / "d", command=descriptor_limit(DESCRIPTOR_LIMIT))
    started = _Processes.of(d)
    pid = started.pid
    host, port = d.address.rsplit(":", 1)
    idle: list[socket.socket] = []
    exhausted = False

    def exhaust() -> None:
        nonlocal exhausted
        for _ in range(DESCRIPTOR_LIMIT + 64):
            try:
                idle.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break  # the listen backlog is full too
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not exhausted:
            exhausted = _open_descriptors(pid) >= DESCRIPTOR_LIMIT - 1
            time.sleep(0.1)
        hsmsignd(ft.config, "keys", "create", "other")

    def release() -> None:
        for s in idle:
            s.close()

    try:
        run = _through_fault(d, exhaust, release, hold=3 * REFRESH_SECONDS + 3)
        found = Findings()
        if not exhausted:
            found.add(
                f"the daemon never ran out of descriptors ({_open_descriptors(pid)} open, "
                f"limit {DESCRIPTOR_LIMIT}): the test did not make the fault"
            )
        # While descriptors are out, a call may still sign (nothing new to open) or be
        # UNAVAILABLE; it must never be wrong or NOT_FOUND.
        check_answers(found, run.outcomes, DIGEST, {"demo": ft.demo})
        _check_listed_during(found, run, {"demo"})
        _check_recovery(found, run, d, started)
        _check_keys_listed(found, d, {"demo", "other"})
    finally:
        release()
        d.stop()
    check_log(found, d.log(), [ft.token.pin])
    assert not found.problems, "descriptors exhausted:\n" + found.report()


# -- 5: the PIN changed under the daemon -----------------------------------------------------

#: A refused PIN must stop the daemon within this after the login that is refused can happen.
PIN_STOP_SECONDS = 60.0
#: The log line of a refused PIN names it so (server.pkcs11.token).
_REFUSED = re.compile(r"refused the PIN|PIN is locked|PIN has expired", re.IGNORECASE)
#: The supervisor's report of a serving process's exit, which may quote the child's reason.
_CHILD_EXIT = re.compile(r"serving process \d+/\d+.*exit", re.IGNORECASE)
#: A log line's time and serving-process tag (``2026-12-02 04:34:24,623 ERROR [2/2] ...``).
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3}) \w+ (\[\d+/\d+\] )?")


def _refusals(log: str) -> dict[str, list[float]]:
    """The times (seconds of the day) of the timestamped lines that say the PIN was refused,
    by serving-process tag ("" for a daemon serving from its own process)."""
    seen: dict[str, list[float]] = {}
    for line in log.splitlines():
        m = _LOG_LINE.match(line)
        if m is None or not _REFUSED.search(line) or _CHILD_EXIT.search(line):
            continue
        h, mi, sec, ms = (int(g) for g in m.groups()[:4])
        seen.setdefault(m.group(5) or "", []).append(h * 3600 + mi * 60 + sec + ms / 1000)
    return seen


def _change_pin(token: TokenDir, new_pin: str) -> None:
    subprocess.run(
        [
            "pkcs11-tool",
            "--module",
            SOFTHSM_MODULE,
            "--token-label",
            token.label,
            "--login",
            "--pin",
            token.pin,
            "--change-pin",
            "--new-pin",
            new_pin,
        ],
        env=token.env(),
        check=True,
        capture_output=True,
        timeout=60,
    )


def _wait_exit(d: Daemon, bound: float) -> int | None:
    try:
        return d.proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        return None


@pytest.mark.parametrize(
    ("processes", "how"),
    [
        (1, "token moved away and back"),
        (2, "token moved away and back"),
        (2, "SIGKILL"),
    ],
)
def test_changed_pin_stops_the_daemon_once_with_exit_77(
    tmp_path: Path, bounded: None, processes: int, how: str
) -> None:
    """The PIN is changed on the token while the daemon runs (its PIN file keeps the old
    one); then a fault makes it log in again (the token moved away and back), or a serving
    process dies and the supervisor starts another. The refused PIN is tried once per
    process at most: the daemon stops serving, logs why, and exits 77; no process is started
    again after a refusal."""
    ft = _fault_token(tmp_path, processes)
    old_pin, new_pin = ft.token.pin, "changed-" + ft.token.pin[:8]
    store = token_store(ft.token)
    away = _away(ft.token, store)
    d = start_daemon(ft.config, tmp_path / "d")
    found = Findings()
    try:
        with (
            ChildWatch(d.proc.pid) as children,
            HealthWatch(d.address) as watch,
            SignLoad(d.address, DIGEST, threads=processes) as load,
        ):
            _wait_serving(load, watch)
            workers_at_start = set(_workers(d)) or {d.proc.pid}
            _change_pin(ft.token, new_pin)
            if how == "SIGKILL":
                os.kill(_workers(d)[0], signal.SIGKILL)
            else:
                store.rename(away)
                try:
                    time.sleep(DETECT_SECONDS)
                finally:
                    away.rename(store)
            code = _wait_exit(d, PIN_STOP_SECONDS)
            outcomes = load.outcomes()
        if code is None:
            found.add(
                f"still running {PIN_STOP_SECONDS:g}s after the PIN became wrong: last answers "
                f"{[o.describe() for o in outcomes[-2:]]}, health "
                f"{[h.status for h in watch.samples()[-2:]]}"
            )
        elif code != 77:
            found.add(f"exit code {code}, not 77 (server.errors.PinRefused)")
        check_answers(found, outcomes, DIGEST, {"demo": ft.demo})
        log = d.log()
        # One refusal per process, reported in a few lines at once; a retry says it again later.
        refusals = _refusals(log)
        # A serving process refused at its start says so in its one start-up error line.
        if not any(_REFUSED.search(line) for line in log.splitlines()):
            found.add("no log line says the token refused the PIN")
        for tag, times in refusals.items():
            if len(times) > 3 or max(times) - min(times) > 1.0:
                found.add(
                    f"the refused PIN was reported {len(times)} times over "
                    f"{max(times) - min(times):.1f}s by serving process {tag or 'main'}: retried"
                )
        # Started after the start: the SIGKILL may be followed by one replacement (nobody
        # knows the PIN is wrong yet); nothing may be started after a refusal.
        started = children.seen - workers_at_start - {d.proc.pid}
        allowed = 1 if how == "SIGKILL" else 0
        if processes > 1 and len(started) > allowed:
            found.add(
                f"the supervisor started {len(started)} serving processes after the PIN "
                f"changed (at most {allowed}): a restart loop on a refused PIN"
            )
    finally:
        d.stop()
        if away.exists():
            away.rename(store)
    check_log(found, d.log(), [old_pin, new_pin])
    assert not found.problems, f"PIN changed, then {how} ({processes} processes):\n" + (
        found.report()
    )
