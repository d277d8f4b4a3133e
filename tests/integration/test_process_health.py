"""The supervisor watches its serving processes, not only their exits (issue 16): a refused
PIN stops the daemon (exit 77) after one login attempt, and a serving process that stops
answering (SIGSTOP) is replaced while clients with a deadline and retries keep getting
signatures that verify."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import load_der_public_key

from hsmsign.connection import channel_options
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.conftest import Daemon, start_daemon
from tests.harness.tokens import token_with_keys, write_config

DIGEST = hashlib.sha256(b"hsmsign process health").digest()
#: Callers on connections of their own: 12 all on one of two processes has odds of 1 in 2,048.
CALLERS = 12
#: Each call's deadline, retries included (the hsmsign CLI's default is 30 s too).
CALL_DEADLINE_SECONDS = 30.0
#: The replacement's bound in this test: the heartbeat limit (5 s) and a start-up, on a
#: loaded machine.
REPLACED_WITHIN_SECONDS = 40.0


def _workers(d: Daemon) -> list[int]:
    workers = json.loads((d.tmp / "ready.json").read_text())["workers"]
    assert isinstance(workers, list)
    return [int(p) for p in workers]


def test_a_refused_pin_is_tried_once_and_the_daemon_exits_77(tmp_path: Path) -> None:
    """The PIN changes while two serving processes run; one dies. Its replacement's login is
    refused: the supervisor starts nothing more, stops the other process and exits 77."""
    token, _ = token_with_keys(tmp_path / "t", ["demo"], label="hsmsign-pin-change")
    cfg = write_config(tmp_path / "c.toml", token, extra="[server]\nprocesses = 2\n")
    d = start_daemon(cfg, tmp_path / "d")
    try:
        victim, survivor = _workers(d)
        # The token's PIN changes (an operator, a rotation policy); the PIN file keeps the old.
        token.pkcs11_tool("--change-pin", "--new-pin", "new-pin-8642")
        os.kill(victim, signal.SIGKILL)
        try:
            code = d.proc.wait(timeout=60)
        except Exception:
            raise AssertionError(f"the supervisor kept running:\n{d.log()[-3000:]}") from None
    finally:
        d.stop(signal.SIGKILL)
    log = d.log()
    assert code == 77, log[-3000:]
    # One replacement, one refused login: nothing tried the old PIN again.
    assert log.count("starting it again") == 1, log[-3000:]
    assert len([ln for ln in log.splitlines() if "the token refused the PIN from" in ln]) == 1
    errors = [ln for ln in log.splitlines() if ln.startswith("hsmsignd: error:")]
    assert "PIN" in errors[-1] and "not restarting" in errors[-1], log[-3000:]
    assert "Traceback" not in log
    assert not Path(f"/proc/{survivor}").exists(), "the other serving process outlived it"


def _channel(address: str) -> grpc.Channel:
    """hsmsign's own channel (hsmsign.connection: keepalive, retries of UNAVAILABLE) on a
    connection of its own, as a separate build agent would have: the kernel spreads such
    connections over the serving processes."""
    return grpc.insecure_channel(address, options=channel_options(separate=True))


def _sign(stub: pb_grpc.SignerStub) -> bytes:
    resp: pb.SignDigestResponse = stub.SignDigest(
        pb.SignDigestRequest(
            key=pb.KeyRef(name="demo"),
            algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
            digest=DIGEST,
        ),
        timeout=CALL_DEADLINE_SECONDS,
    )
    return resp.signature


def test_a_stopped_serving_process_is_replaced_and_callers_move(tmp_path: Path) -> None:
    """SIGSTOP one of two serving processes under steady load: the supervisor replaces it
    within a bounded time (server.heartbeat_timeout_seconds, default 5 s, plus its 0.2 s
    checks), and callers with hsmsign's channel settings (a deadline, retries of
    UNAVAILABLE) keep getting signatures that verify."""
    token, _ = token_with_keys(tmp_path / "t", ["demo"], label="hsmsign-sigstop")
    cfg = write_config(tmp_path / "c.toml", token, extra="[server]\nprocesses = 2\n")
    d = start_daemon(cfg, tmp_path / "d")
    stop_load = threading.Event()
    answered: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    with _channel(d.address) as ch:
        der = pb_grpc.SignerStub(ch).GetPublicKey(
            pb.GetPublicKeyRequest(key=pb.KeyRef(name="demo")), timeout=30
        )
    pub = load_der_public_key(der.spki_der)
    assert isinstance(pub, rsa.RSAPublicKey)

    def caller() -> None:
        with _channel(d.address) as ch:
            stub = pb_grpc.SignerStub(ch)
            while not stop_load.is_set():
                try:
                    sig = _sign(stub)
                    pub.verify(sig, DIGEST, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
                    with lock:
                        answered.append(time.monotonic())
                except Exception as e:
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                time.sleep(0.05)

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(CALLERS)]
    victim = _workers(d)[0]
    replaced_at = None
    try:
        for t in threads:
            t.start()
        time.sleep(2)
        os.kill(victim, signal.SIGSTOP)
        stopped_at = time.monotonic()
        while time.monotonic() < stopped_at + REPLACED_WITHIN_SECONDS:
            after = d.log().split(f"(pid {victim}) stopped answering")
            if len(after) > 1 and "serving process 1/2 ready" in after[-1]:
                replaced_at = time.monotonic()
                break
            time.sleep(0.1)
        time.sleep(2)  # the load goes on with the replacement
    finally:
        stop_load.set()
        for t in threads:
            t.join(CALL_DEADLINE_SECONDS + 10)
        for sig in (signal.SIGKILL, signal.SIGCONT):  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, sig)
        d.stop()
    log = d.log()
    assert replaced_at is not None, f"not replaced in {REPLACED_WITHIN_SECONDS} s:\n{log[-3000:]}"
    print(f"replaced {replaced_at - stopped_at:.1f} s after SIGSTOP")
    assert not failures, f"{len(failures)} failed calls, first: {failures[:3]}"
    assert len([t for t in answered if t > replaced_at]) > CALLERS, "no answers after it"
    # The callers on the stopped process got their answers too (retried on the other).
    assert any(stopped_at + 1 < t < replaced_at for t in answered)
