"""Concurrent key-ring writes from two daemons and the offline CLI on one SoftHSM2 token
(issue 16, docs/adr/0007-keyring-state-concurrency.md).

Each round, at the same moment: daemon B rotates the key, daemon A disables one version, and
``hsmsignd keys`` (a third process, straight on the token) enables or disables another, while
both daemons keep signing with the version A disables. After every round:

- no update is lost: every write that returned OK is in the ring;
- the ring converges: both daemons and the CLI list the same versions, states and primary;
- one state document is left in the token (pkcs11-tool lists the data objects);
- no signature with the disabled version verifies for a call made after its disable
  returned plus ``keyring.refresh_seconds``.

Problems are collected over every round and reported together, so a failure says how often.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign import names
from hsmsign.admin import KeyAdmin
from hsmsign.client import Client
from hsmsign.errors import RemoteError
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.harness import TokenDir, hsmsignd, start_daemon
from tests.harness.daemons import Daemon
from tests.harness.tokens import token_with_keys

ROUNDS = 8
REFRESH_SECONDS = 0.5
#: How long the ring may take to settle after a round's writes (a loaded machine is slow).
SETTLE_SECONDS = 30.0
#: Signing goes on this long after the disable returned (past the bound, to catch a stale cache).
SIGN_AFTER_DISABLE_SECONDS = REFRESH_SECONDS + 2.0
STATE_LABEL = "hsmsign:keyring"
KEY = "app"
DIGEST = hashlib.sha256(b"concurrent admin writes").digest()
EXTRA = f"[server]\nprocesses = 2\n[keyring]\nrefresh_seconds = {REFRESH_SECONDS}\n"

#: A ring as every reader should list it: primary version, and state by version.
Listing = tuple[int, dict[int, str]]


def _state_name(state: pb.KeyVersionState.ValueType) -> str:
    return names.name_of(names.KEY_VERSION_STATES, state)


def _listing_pb(key: pb.Key) -> Listing:
    return key.primary_version, {v.version: _state_name(v.state) for v in key.versions}


def _listing_cli(config: Path) -> Listing:
    out = json.loads(hsmsignd(config, "keys", "get", KEY, "--json").stdout)
    return out["primary_version"], {v["version"]: v["state"] for v in out["versions"]}


def _public_key(key: pb.Key, version: int) -> rsa.RSAPublicKey:
    v = next(v for v in key.versions if v.version == version)
    pub = serialization.load_pem_public_key(v.spki_pem.encode())
    assert isinstance(pub, rsa.RSAPublicKey)
    return pub


def _verifies(pub: rsa.RSAPublicKey, signature: bytes) -> bool:
    try:
        pub.verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


@dataclass
class Signer:
    """Signs with one version through one daemon until stopped; records when each call that
    produced a verifying signature started."""

    address: str
    ref: str
    public_key: rsa.RSAPublicKey
    stop: threading.Event = field(default_factory=threading.Event)
    signed_at: list[float] = field(default_factory=list)

    def run(self) -> None:
        with Client(self.address, timeout=30) as c:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    sig = c.sign_digest(self.ref, DIGEST).signature
                except RemoteError:
                    time.sleep(0.02)
                    continue
                if _verifies(self.public_key, sig):
                    self.signed_at.append(started)


@dataclass
class Round:
    """One round's writes and what each returned."""

    disable_version: int
    toggle_version: int
    toggle_to: str
    rotated: int | None = None
    disabled_ok: bool = False
    disable_returned_at: float = 0.0
    toggle_ok: bool = False
    errors: list[str] = field(default_factory=list)


def _choosable(listing: Listing) -> bool:
    """Whether a round can start: an enabled non-primary version for A to disable, and
    another non-primary one for the CLI to toggle (a failed round may have used them up)."""
    primary, states = listing
    others = [v for v, s in states.items() if v != primary and s in ("enabled", "disabled")]
    return len(others) >= 2 and any(states[v] == "enabled" for v in others)


def _choose(listing: Listing) -> tuple[int, int, str]:
    """The version A disables (enabled, not primary: the newest such) and the version the CLI
    toggles (another non-primary one: the oldest such), with the state it goes to."""
    primary, states = listing
    others = sorted(v for v, s in states.items() if v != primary and s in ("enabled", "disabled"))
    enabled = [v for v in others if states[v] == "enabled"]
    disable = enabled[-1]
    toggle = next(v for v in others if v != disable)
    return disable, toggle, "disabled" if states[toggle] == "enabled" else "enabled"


def _expected(before: Listing, r: Round) -> tuple[Listing, set[int]]:
    """The ring after the round if every write that returned OK took effect, and the versions
    whose state is open (a write that failed may or may not have happened)."""
    primary, states = before[0], dict(before[1])
    open_versions: set[int] = set()
    if r.disabled_ok:
        states[r.disable_version] = "disabled"
    else:
        open_versions.add(r.disable_version)
    if r.toggle_ok:
        states[r.toggle_version] = r.toggle_to
    else:
        open_versions.add(r.toggle_version)
    if r.rotated is not None:
        states[r.rotated] = "enabled"
    else:  # a rotation that failed may have made its version before it failed
        open_versions.add(max(states) + 1)
    return (primary, states), open_versions


def _matches(listing: Listing, expected: Listing, open_versions: set[int]) -> bool:
    (primary, states), (want_primary, want) = listing, expected
    if primary != want_primary:
        return False
    if {v for v in states if v not in open_versions} != {v for v in want if v not in open_versions}:
        return False
    return all(states.get(v) == s for v, s in want.items() if v not in open_versions)


def _state_documents(token: TokenDir) -> int:
    return sum(1 for o in token.objects("Data") if o.label == STATE_LABEL)


def _run_round(a: Daemon, b: Daemon, config: Path, before: Listing, key: pb.Key) -> Round:
    disable, toggle, toggle_to = _choose(before)
    r = Round(disable, toggle, toggle_to)
    start = threading.Barrier(3)

    def rotate() -> None:
        with Client(b.address, timeout=60) as c:
            start.wait()
            try:
                rotated = KeyAdmin(c).rotate_key(KEY, make_primary=False)
                r.rotated = max(v.version for v in rotated.versions)
            except RemoteError as e:
                r.errors.append(f"rotate via B: {e}")

    def disable_via_a() -> None:
        with Client(a.address, timeout=60) as c:
            start.wait()
            try:
                KeyAdmin(c).disable(KEY, disable)
                r.disabled_ok = True
            except RemoteError as e:
                r.errors.append(f"disable v{disable} via A: {e}")
            r.disable_returned_at = time.monotonic()

    def toggle_offline() -> None:
        action = "enable" if toggle_to == "enabled" else "disable"
        start.wait()
        out = hsmsignd(config, "keys", action, KEY, str(toggle), check=False)
        r.toggle_ok = out.returncode == 0
        if not r.toggle_ok:
            r.errors.append(f"offline {action} v{toggle}: {out.stderr.strip()}")

    pub = _public_key(key, disable)
    signers = [Signer(d.address, f"{KEY}@{disable}", pub) for d in (a, b)]
    threads = [threading.Thread(target=s.run) for s in signers]
    writers = [threading.Thread(target=f) for f in (rotate, disable_via_a, toggle_offline)]
    for t in threads + writers:
        t.start()
    for t in writers:
        t.join(300)
    assert not any(t.is_alive() for t in writers), "a key-ring write hung"
    time.sleep(max(0.0, r.disable_returned_at + SIGN_AFTER_DISABLE_SECONDS - time.monotonic()))
    for s in signers:
        s.stop.set()
    for t in threads:
        t.join(120)
    if r.disabled_ok:
        bound = r.disable_returned_at + REFRESH_SECONDS
        for name, s in zip("AB", signers, strict=True):
            late = [t - r.disable_returned_at for t in s.signed_at if t > bound]
            if late:
                r.errors.append(
                    f"v{disable} signed through {name} {max(late):.2f} s after its disable "
                    f"returned ({len(late)} calls past the {REFRESH_SECONDS} s bound)"
                )
    return r


def _settle(a: Daemon, b: Daemon, config: Path, expected: Listing, open_versions: set[int]) -> str:
    """Waits until A, B and the CLI list the same ring; returns what is wrong, if anything."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        try:
            with Client(a.address) as ca, Client(b.address) as cb:
                seen = {
                    "A": _listing_pb(KeyAdmin(ca).get_key(KEY)),
                    "B": _listing_pb(KeyAdmin(cb).get_key(KEY)),
                    "CLI": _listing_cli(config),
                }
        except (RemoteError, AssertionError) as e:
            # UNAVAILABLE while a read races a write is an honest answer; it must pass.
            if time.monotonic() > deadline:
                return f"never readable: {e}"
            time.sleep(0.5)
            continue
        agree = seen["A"] == seen["B"] == seen["CLI"]
        if agree and _matches(seen["A"], expected, open_versions):
            return ""
        if time.monotonic() > deadline:
            return f"did not converge to {expected} (open: {sorted(open_versions)}): {seen}"
        time.sleep(0.5)


def test_concurrent_admin_writes_lose_nothing(tmp_path: Path) -> None:
    token, config = token_with_keys(tmp_path, [KEY], extra=EXTRA)
    for _ in range(2):  # versions 2 and 3: one to disable, one to toggle
        hsmsignd(config, "keys", "rotate", KEY, "--no-primary")
    a = start_daemon(config, tmp_path / "a")
    b = start_daemon(config, tmp_path / "b")
    problems: list[str] = []
    try:
        for n in range(ROUNDS):
            with Client(a.address) as ca:
                key = KeyAdmin(ca).get_key(KEY)
                while not _choosable(_listing_pb(key)):  # after a failed round
                    KeyAdmin(ca).rotate_key(KEY, make_primary=False)
                    key = KeyAdmin(ca).get_key(KEY)
            before = _listing_pb(key)
            r = _run_round(a, b, config, before, key)
            expected, open_versions = _expected(before, r)
            wrong = _settle(a, b, config, expected, open_versions)
            documents = _state_documents(token)
            round_problems = list(r.errors)
            if wrong:
                round_problems.append(wrong)
            if documents != 1:
                round_problems.append(f"{documents} state documents in the token after settling")
            problems += [f"round {n + 1}: {p}" for p in round_problems]
    finally:
        a.stop()
        b.stop()
    failed_rounds = {p.split(":")[0] for p in problems}
    assert not problems, f"{len(failed_rounds)} of {ROUNDS} rounds failed:\n" + "\n".join(problems)
