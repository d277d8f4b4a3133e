"""The bench's bare stack server (bench/bare_server.py): it must sign with the same token key
the daemon uses, or its rows would measure something else. Its signatures are checked with
OpenSSL against the daemon's public key, in each of its server forms."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import grpc
import pytest

from bench.bare_server import BareServer
from bench.h2load import H2Spec, grpc_frame, run_h2load
from bench.report import targets
from bench.run import _token_args
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.conftest import Daemon, TokenDir


@pytest.mark.parametrize(
    "form", [[], ["--aio", "inline"], ["--aio", "executor"]], ids=["sync", "aio", "aio-pool"]
)
def test_bare_server_signs_with_the_daemons_key(
    token: TokenDir, daemon: Daemon, tmp_path: Path, form: list[str]
) -> None:
    message = b"bench" * 100
    request = pb.SignDigestRequest(
        key=pb.KeyRef(name="demo"),
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
        digest=hashlib.sha256(message).digest(),
    )
    pub = tmp_path / "pub.pem"
    daemon.hsmsign("pubkey", "demo", "-o", str(pub))
    bare = BareServer(_token_args(token, "demo"), "--processes", "2", *form)
    try:
        with grpc.insecure_channel(bare.address) as channel:
            sig = pb_grpc.SignerStub(channel).SignDigest(request, timeout=30).signature
        # Under load from h2load too (the bench's own driver), then still answering.
        r = run_h2load(
            H2Spec(bare.address, "hsmsign.v1.Signer/SignDigest", 4, 1, 1), grpc_frame(request)
        )
        assert r["calls"] > 10 and r["http_failed"] == 0
        with grpc.insecure_channel(bare.address) as channel:
            again = pb_grpc.SignerStub(channel).SignDigest(request, timeout=30).signature
    finally:
        bare.stop()
    assert bare.proc.returncode == 0
    assert again == sig  # PKCS#1 v1.5 is deterministic
    (tmp_path / "msg").write_bytes(message)
    (tmp_path / "sig").write_bytes(sig)
    verify = ["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature"]
    r2 = subprocess.run(
        [*verify, str(tmp_path / "sig"), str(tmp_path / "msg")], capture_output=True, text=True
    )
    assert r2.returncode == 0 and "Verified OK" in r2.stdout


def test_bare_server_start_failure_is_an_error(token: TokenDir) -> None:
    args = _token_args(token, "no-such-key")
    with pytest.raises(RuntimeError, match="exited"):
        BareServer(args, "--processes", "1")


def test_report_puts_the_bare_stack_beside_the_targets() -> None:
    bracket = {"ops_per_s": 1000.0, "p50_ms": 1.0}
    rows = [
        {"group": "token", "bits": 2048, "name": "token", "ops_per_s": 1000.0, "p50_ms": 1.0},
        {
            "group": "daemon",
            "name": "unary SignDigest, 64 callers (h2load)",
            "daemon": "processes=default sessions=default workers=default log=INFO",
            "load": "h2load",
            "ops_per_s": 700.0,
            "token_bracket": bracket,
        },
        {
            "group": "daemon",
            "name": "unary paced at half max (350 calls/s), 8 callers (h2load)",
            "daemon": "processes=default sessions=default workers=default log=INFO",
            "load": "h2load",
            "paced": True,
            "ops_per_s": 350.0,
            "p99_ms": 6.0,
            "token_bracket": bracket,
        },
        {
            "group": "bare",
            "name": "bare stack (grpcio + python-pkcs11, no hsmsign code): unary",
            "load": "h2load",
            "ops_per_s": 750.0,
            "token_bracket": bracket,
        },
        {
            "group": "bare",
            "name": "bare stack (grpcio + python-pkcs11, no hsmsign code): paced",
            "load": "h2load",
            "paced": True,
            "ops_per_s": 350.0,
            "p99_ms": 5.0,
            "token_bracket": bracket,
        },
    ]
    by_name = {t["target"]: t for t in targets(rows)}
    unary = by_name["unary at 64 callers / token limit"]
    assert unary["value"] == 0.7
    assert "the bare stack (no hsmsign code) reaches 0.75x, hsmsign 0.93 of that" in unary["detail"]
    p99 = by_name["p99 at half max unary / token p50"]
    assert p99["value"] == 6.0
    assert "the bare stack (no hsmsign code) at that rate: p99 5.00 ms = 5.00x" in p99["detail"]
