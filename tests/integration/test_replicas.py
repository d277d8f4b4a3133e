"""Replicas of one daemon behind one client target (the issue's scale-out scenario): three
replicas on one token under load from the hsmsign client with the three addresses; one is
SIGKILLed while calls run, then another is restarted (SIGTERM, then a new daemon on the same
port). No call fails (the client's retry policy sends each to a replica that serves) and every
signature verifies; the restarted replica serves again."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign.client import Client
from hsmsign.errors import RemoteError
from tests.harness import HSMSIGN, Daemon, TokenDir, start_daemon, write_config

#: Enough that a dozen or so calls are in flight on the replica that is killed: a client whose
#: retry throttle stops retrying after 5 failures (maxTokens 10) failed some of them.
CALLERS = 24
#: Calls made (over every caller) before each step of the scenario.
CALLS_PER_STEP = 60
#: Seconds any step may take on a loaded machine before the test gives up.
STEP_TIMEOUT = 180


def _signed_by(d: Daemon) -> bool:
    return "SignDigest peer=" in d.log() or "SignDigests peer=" in d.log()


def test_replica_killed_then_another_restarted_fails_no_call(
    token: TokenDir, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "replica.toml", token, extra="[server]\nprocesses = 1")
    killed, restarted, steady = (start_daemon(config, tmp_path / n) for n in ("a", "b", "c"))
    replacement: Daemon | None = None
    target = ",".join(d.address for d in (killed, restarted, steady))
    results: list[tuple[bytes, bytes]] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def wait_for_calls(n: int) -> None:
        end = time.monotonic() + STEP_TIMEOUT
        with lock:
            goal = len(results) + len(failures) + n
        while time.monotonic() < end:
            with lock:
                if len(results) + len(failures) >= goal:
                    return
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} calls in {STEP_TIMEOUT} s")

    try:
        with Client(target, timeout=60) as client:
            public = serialization.load_der_public_key(client.public_key("demo").spki_der)
            assert isinstance(public, rsa.RSAPublicKey)

            def caller(n: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    # Every fourth call a small batch, the others one digest.
                    count = 1 if i % 4 else 3
                    digests = [
                        hashlib.sha256(f"{n}/{i}/{j}".encode()).digest() for j in range(count)
                    ]
                    try:
                        if count == 1:
                            got = [client.sign_digest("demo", digests[0]).signature]
                        else:
                            got = client.sign_digests("demo", digests)[1]
                    except RemoteError as e:
                        with lock:
                            failures.append(str(e))
                        continue
                    with lock:
                        if len(got) != count:
                            failures.append(f"{len(got)} signatures for {count} digests")
                        results.extend(zip(digests, got, strict=False))

            threads = [threading.Thread(target=caller, args=(n,)) for n in range(CALLERS)]
            for t in threads:
                t.start()
            try:
                wait_for_calls(CALLS_PER_STEP)
                killed.proc.send_signal(signal.SIGKILL)
                killed.proc.wait(30)
                wait_for_calls(CALLS_PER_STEP)
                assert restarted.stop() == 0  # drains: health NOT_SERVING, then UNAVAILABLE
                wait_for_calls(CALLS_PER_STEP // 2)  # served by the one replica left
                replacement = start_daemon(
                    config, tmp_path / "b-again", "--listen", restarted.address
                )
                end = time.monotonic() + STEP_TIMEOUT
                while not _signed_by(replacement) and time.monotonic() < end:
                    time.sleep(0.1)
                wait_for_calls(CALLS_PER_STEP)
            finally:
                stop.set()
                for t in threads:
                    t.join(120)
            assert not any(t.is_alive() for t in threads)
    finally:
        for d in (killed, restarted, steady, replacement):
            if d is not None:
                d.stop(signal.SIGKILL)
    assert failures == []
    assert len(results) >= 3 * CALLS_PER_STEP
    for digest, sig in results:
        public.verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    # round_robin spread the calls over every replica, the restarted one included.
    assert _signed_by(killed) and _signed_by(restarted) and _signed_by(steady)
    assert replacement is not None and _signed_by(replacement), replacement.log()


def test_cli_takes_several_addresses_and_a_timeout(token: TokenDir, tmp_path: Path) -> None:
    config = write_config(tmp_path / "replica.toml", token, extra="[server]\nprocesses = 1")
    first = start_daemon(config, tmp_path / "first")
    second = start_daemon(config, tmp_path / "second")
    sign = ["sign", "--key", "demo", "--digest", hashlib.sha256(b"release").hexdigest()]
    try:
        first.stop(signal.SIGKILL)  # one replica down: the CLI uses the other
        r = subprocess.run(
            [HSMSIGN, "--server", f"{first.address},{second.address}", "--timeout", "20", *sign],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        bad = subprocess.run(
            [HSMSIGN, "--server", second.address, "--timeout", "0", *sign],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2
        assert "--timeout: '0' is not a number of seconds above 0" in bad.stderr
    finally:
        assert second.stop() == 0
