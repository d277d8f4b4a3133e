"""Two replicas on one token behind one client target: one is SIGKILLed while calls run,
and no call fails (the client's retry policy sends it to the other) and every signature
verifies."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import threading
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign.client import Client
from hsmsign.errors import RemoteError
from tests.harness import HSMSIGN, TokenDir, start_daemon, write_config

CALLERS = 4
CALLS_EACH = 40
#: Calls made (over every caller) before the first replica is killed.
KILL_AFTER = 40


def test_sigkill_of_one_replica_fails_no_call(token: TokenDir, tmp_path: Path) -> None:
    config = write_config(tmp_path / "replica.toml", token, extra="[server]\nprocesses = 1")
    first = start_daemon(config, tmp_path / "first")
    second = start_daemon(config, tmp_path / "second")
    target = f"{first.address},{second.address}"
    done = threading.Semaphore(0)
    results: list[tuple[bytes, bytes]] = []
    failures: list[RemoteError] = []
    lock = threading.Lock()
    try:
        with Client(target, timeout=60) as client:
            public = serialization.load_der_public_key(client.public_key("demo").spki_der)
            assert isinstance(public, rsa.RSAPublicKey)

            def caller(n: int) -> None:
                for i in range(CALLS_EACH):
                    digest = hashlib.sha256(f"{n}/{i}".encode()).digest()
                    try:
                        sig = client.sign_digest("demo", digest).signature
                        with lock:
                            results.append((digest, sig))
                    except RemoteError as e:
                        with lock:
                            failures.append(e)
                    done.release()

            threads = [threading.Thread(target=caller, args=(n,)) for n in range(CALLERS)]
            for t in threads:
                t.start()
            for _ in range(KILL_AFTER):
                assert done.acquire(timeout=120)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(30)
            for t in threads:
                t.join(300)
            assert not any(t.is_alive() for t in threads)
    finally:
        first.stop(signal.SIGKILL)
        assert second.stop() == 0
    assert failures == []
    assert len(results) == CALLERS * CALLS_EACH
    for digest, sig in results:
        public.verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    # round_robin spread the calls: both replicas signed before the kill.
    assert "SignDigest peer=" in first.log() and "SignDigest peer=" in second.log()


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
