"""One ``Client`` used by many threads (a build agent) against a daemon with two serving
processes on one port: the calls reach both processes. The kernel spreads connections, not
calls, over the processes (SO_REUSEPORT), so a client that sends everything over one
connection leaves the other process idle (issue #17: 400 callers on one connection all
landed on one serving process)."""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign.client import Client
from tests.harness import TokenDir, start_daemon, write_config

CALLERS = 64
CALLS = 256
#: Connections asked for. The kernel puts each new connection on a serving process chosen by
#: a hash of its addresses and ports, so with 2 processes all of N connections land on the
#: same one with probability 2**(1-N): about 3 in 100,000 for 16.
CONNECTIONS = 16

#: An access log line: ``... INFO [1/2] hsmsign.access: SignDigest peer=ipv4:... status=OK``.
_LINE = re.compile(r"INFO \[(\d+)/2\] hsmsign\.access: SignDigest peer=(\S+) status=OK ")


def _answered(log: str) -> list[tuple[str, str]]:
    """(serving process, client peer) of every SignDigest that the daemon answered OK."""
    return _LINE.findall(log)


def test_one_client_many_threads_reaches_every_serving_process(
    token: TokenDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_config(tmp_path / "two.toml", token, extra="[server]\nprocesses = 2")
    daemon = start_daemon(config, tmp_path / "d")
    monkeypatch.setenv("HSMSIGN_CONNECTIONS", str(CONNECTIONS))
    digests = [hashlib.sha256(f"spread/{i}".encode()).digest() for i in range(CALLS)]
    try:
        with Client(daemon.address, timeout=60) as client:
            public = serialization.load_der_public_key(client.public_key("demo").spki_der)
            assert isinstance(public, rsa.RSAPublicKey)
            with ThreadPoolExecutor(CALLERS) as pool:
                signatures = list(
                    pool.map(lambda d: client.sign_digest("demo", d).signature, digests)
                )
        for digest, sig in zip(digests, signatures, strict=True):
            public.verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        # Lines reach the log from a writer thread: wait until every call's line is there.
        end = time.monotonic() + 30
        while len(_answered(daemon.log())) < CALLS and time.monotonic() < end:
            time.sleep(0.05)
        answered = _answered(daemon.log())
    finally:
        assert daemon.stop() == 0
    assert len(answered) == CALLS
    by_process = Counter(process for process, _ in answered)
    peers = {peer for _, peer in answered}
    # Both processes answered some, over several of the client's connections.
    assert set(by_process) == {"1", "2"}, f"calls per serving process: {dict(by_process)}"
    assert len(peers) > 1, f"every call came over one connection: {peers}"
