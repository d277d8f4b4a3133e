"""The bench's bare stack server (bench/bare_server.py): it must sign with the same token key
the daemon uses, or its rows would measure something else. Its signatures are checked with
OpenSSL against the daemon's public key, in each of its server forms."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.bare_server import BareServer
from bench.h2load import H2Spec, grpc_frame, run_h2load
from bench.report import p99_floor, table, targets
from bench.rows import AnyRow, Call, CallRow, Load, Server, TokenBracket, TokenRow
from bench.run import _token_args, p99_floor_rows
from bench.setup import DaemonSettings
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


DEFAULT = "processes=default sessions=default workers=default log=INFO"
TOKEN = TokenRow(name="token", bits=2048, threads=2, ops_per_s=1000.0, p50_ms=1.0)


def _call(
    name: str,
    ops: float,
    bracket: float = 1.0,
    *,
    server: Server = Server.HSMSIGND,
    paced: bool = False,
    **kw: Any,
) -> CallRow:
    """A unary row at 64 callers (or paced at 8) under h2load, the token measured around it
    at ``bracket`` times the reference."""
    fields: dict[str, Any] = {
        "settings": DEFAULT if server is Server.HSMSIGND else "bare stack",
        "call": Call.UNARY,
        "callers": 8 if paced else 64,
        "load": Load.H2LOAD,
        "token_bracket": TokenBracket(ops_per_s=1000.0 * bracket, p50_ms=1.0 * bracket),
    }
    return CallRow(name=name, server=server, paced=paced, ops_per_s=ops, **{**fields, **kw})


def test_report_puts_the_bare_stack_beside_the_targets() -> None:
    rows: list[AnyRow] = [
        TOKEN,
        _call("unary SignDigest, 64 callers (h2load)", 700.0),
        _call(
            "unary paced at half max (350 calls/s), 8 callers (h2load)",
            350.0,
            paced=True,
            p99_ms=6.0,
        ),
        _call("bare stack: unary", 750.0, server=Server.BARE),
        _call("bare stack: paced", 350.0, server=Server.BARE, paced=True, p99_ms=5.0),
    ]
    by_name = {t["target"]: t for t in targets(rows)}
    unary = by_name["unary at 64 callers / token limit"]
    assert unary["value"] == 0.7
    assert "the bare stack (no hsmsign code) reaches 0.75x, hsmsign 0.93 of that" in unary["detail"]
    p99 = by_name["p99 at half max unary / token p50"]
    assert p99["value"] == 6.0
    assert "the bare stack (no hsmsign code) at that rate: p99 5.00 ms = 5.00x" in p99["detail"]


def test_report_judges_unary_and_p99_on_the_median_of_interleaved_rounds() -> None:
    """With bench.run.interleaved_rounds' rows, the unary and p99 targets are the medians of
    hsmsignd's rounds, each against the token measured around it; a failed round is left
    out, not counted as zero."""
    rows: list[AnyRow] = [
        TOKEN,
        _call("unary SignDigest, 64 callers (h2load)", 700),
        _call("bare stack: unary", 750, server=Server.BARE),
        _call("unary paced at half max", 350, paced=True, p99_ms=6.0),
        _call("bare stack: paced", 350, server=Server.BARE, paced=True, p99_ms=5.0),
    ]
    # Round 2 on a slower moment (the bracket says so), round 3 with a failed bare row.
    hsm, bare = Server.HSMSIGND, Server.BARE
    rounds: list[tuple[int, Server, bool, float, float, dict[str, Any]]] = [
        (2, hsm, False, 600, 0.8, {}),
        (2, bare, False, 640, 0.8, {}),
        (2, hsm, True, 350, 2.0, {"p99_ms": 8.0}),
        (2, bare, True, 350, 2.0, {"p99_ms": 6.0}),
        (3, hsm, False, 760, 1.0, {}),
        (3, bare, False, 0, 1.0, {"not_available": "unary: calls failed {'2': 5}"}),
        (3, hsm, True, 350, 1.0, {"p99_ms": 3.5}),
        (3, bare, True, 350, 1.0, {"p99_ms": 4.0}),
    ]
    for k, who, paced, ops, scale, extra in rounds:
        name = f"round {k}, {who}: {'paced' if paced else 'unary'}"
        rows.append(_call(name, ops, scale, server=who, paced=paced, round=k, **extra))
    by_name = {t["target"]: t for t in targets(rows)}
    unary = by_name["unary at 64 callers / token limit"]
    # hsmsignd 0.70 / 0.75 / 0.76 -> 0.75; bare 0.75 / 0.80 / - -> 0.775.
    assert unary["value"] == 0.75
    assert "median of 3 interleaved rounds: hsmsignd 0.70x / 0.75x / 0.76x" in unary["detail"]
    bare_text = "the bare stack (no hsmsign code) reaches 0.75x / 0.80x / -, median 0.78x"
    assert bare_text in unary["detail"]
    # Per round 0.70 / 0.75 and 0.75 / 0.80; round 3 has no bare value.
    assert "hsmsignd / bare stack 0.94 (median of the rounds)" in unary["detail"]
    p99 = by_name["p99 at half max unary / token p50"]
    # hsmsignd 6.0 / 4.0 / 3.5 -> 4.0; bare 5.0 / 3.0 / 4.0 -> 4.0.
    assert p99["value"] == 4.0 and p99["result"] == "FAIL"
    assert "hsmsignd 6.00x / 4.00x / 3.50x" in p99["detail"]
    assert "at that rate 5.00x / 3.00x / 4.00x, median 4.00x" in p99["detail"]


def test_bare_server_no_sign_answers_without_the_token(token: TokenDir, daemon: Daemon) -> None:
    """``--no-sign``: the p99 floor's gRPC server answers a signature-sized reply of zeros,
    in the same layout, without a token call; under h2load as well."""
    request = pb.SignDigestRequest(
        key=pb.KeyRef(name="demo"),
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
        digest=hashlib.sha256(b"x").digest(),
    )
    bare = BareServer(_token_args(token, "demo"), "--processes", "2", "--no-sign")
    try:
        with grpc.insecure_channel(bare.address) as channel:
            sig = pb_grpc.SignerStub(channel).SignDigest(request, timeout=30).signature
        r = run_h2load(
            H2Spec(bare.address, "hsmsign.v1.Signer/SignDigest", 4, 1, 1), grpc_frame(request)
        )
    finally:
        bare.stop()
    assert sig == bytes(256)
    assert r["calls"] > 10 and r["http_failed"] == 0


def test_p99_floor_rows_measure_grpc_beside_the_token(token: TokenDir, daemon: Daemon) -> None:
    """bench.run.p99_floor_rows end to end on the test token: the no-op server under h2load's
    even schedule while bench.inprocess signs as often; every round's row carries both p99s
    and the token measured around it, and the report reads them."""
    rows = p99_floor_rows(token, 2.0, 100.0, 2, key="demo")
    assert [r.round for r in rows] == [1, 2]
    for r in rows:
        assert r.measured, r.not_available
        assert r.server is Server.NOOP and r.signs_nothing and r.paced
        assert 80 <= r.calls_per_s <= 120  # the schedule was kept at this low rate
        assert (r.p99_ms or 0) > 0 and (r.token_p99_ms or 0) > 0
        assert r.token_bracket is not None and r.token_bracket.p50_ms > 0
    assert len(p99_floor(list(rows))) == 2


def test_report_reads_the_p99_target_against_the_floor() -> None:
    """The p99 target prints the floor's rounds and median, and says when the floor alone is
    above the goal; a failed floor row is left out."""
    paced = _call(
        "unary paced at half max (350 calls/s), 8 callers (h2load)", 350.0, paced=True, p99_ms=9.0
    )

    def floor(k: int, p99: float, p50: float, **kw: Any) -> CallRow:
        return _call(
            f"round {k}, floor", 0.0, p50, server=Server.NOOP, paced=True, round=k, p99_ms=p99, **kw
        )

    rows: list[AnyRow] = [
        TOKEN,
        paced,
        floor(1, 5.0, 1.0),
        floor(2, 8.0, 2.0),
        floor(3, 1.0, 1.0, not_available="no-op calls failed: 3"),
        floor(4, 4.5, 1.0),
    ]
    p99 = {t["target"]: t for t in targets(rows)}["p99 at half max unary / token p50"]
    assert p99["value"] == 9.0 and p99["result"] == "FAIL"
    assert "5.00x / 4.00x / 4.50x, median 4.50x: above the goal" in p99["detail"]
    low: list[AnyRow] = [TOKEN, paced, floor(1, 2.0, 1.0), floor(2, 2.5, 1.0)]
    detail = {t["target"]: t for t in targets(low)}["p99 at half max unary / token p50"]["detail"]
    assert "2.00x / 2.50x, median 2.25x" in detail and "above the goal" not in detail


def test_report_judges_batch_on_the_median_of_its_rounds() -> None:
    """The batch target reads the main batch row and its round rows (bench.run.daemon_rows),
    each against the token measured around it; a failed round is left out."""

    def batch(name: str, ops: float, tok: float, **kw: Any) -> CallRow:
        return CallRow(
            name=name,
            server=Server.HSMSIGND,
            settings=DEFAULT,
            call=Call.BATCH,
            callers=4,
            load=Load.PYTHON,
            batch=64,
            ops_per_s=ops,
            token_bracket=TokenBracket(ops_per_s=tok, p50_ms=1.0),
            **kw,
        )

    failed = "batch: calls failed {'UNAVAILABLE': 4}"
    rows: list[AnyRow] = [
        TOKEN,
        batch("batch SignDigests x64, 4 callers", 910, 1000),
        batch("batch SignDigests x64, 4 callers, RSA-3072", 300, 1000, bits=3072),
        batch("round 2, hsmsignd: batch", 780, 800, round=2),
        batch("round 3, hsmsignd: batch", 0, 1000, round=3, not_available=failed),
        batch("round 4, hsmsignd: batch", 990, 1000, round=4),
    ]
    t = {t["target"]: t for t in targets(rows)}["batched signing / token limit"]
    # 0.91 / 0.975 / - / 0.99 -> 0.975: a PASS that the first row alone would have failed.
    assert t["value"] == 0.975 and t["result"] == "PASS"
    assert "median of 4 rounds: 0.91x / 0.97x / - / 0.99x" in t["detail"]


def test_report_gives_what_audit_costs_a_unary_call() -> None:
    """The audit target's detail also gives unary SignDigest at 16 callers, audit on over off
    per round of bench.run.audit_rows (the issue: what audit costs per call, unary and
    batch); main rows of the same shape without "audit" in their name are not read. (The
    target's batch figure, from sliced rows: tests/unit/test_bench_slices.py.)"""

    def unary(k: int, audit: bool, calls: float, name: str = "") -> CallRow:
        return CallRow(
            name=name or f"round {k}, audit {'on' if audit else 'off'}: unary SignDigest",
            server=Server.HSMSIGND,
            settings=DaemonSettings(audit=audit).describe(),
            call=Call.UNARY,
            callers=16,
            load=Load.PYTHON,
            round=k,
            ops_per_s=calls,
            calls_per_s=calls,
        )

    rows: list[AnyRow] = [TOKEN, unary(1, False, 10_000, name="unary SignDigest, 16 callers")]
    for k, (on, off) in enumerate([(300, 400), (350, 500), (280, 400)], start=1):
        rows += [unary(k, True, on), unary(k, False, off)]
    t = {t["target"]: t for t in targets(rows)}["batched signing, audit on / token limit"]
    assert "audit on / off per round 0.75x / 0.70x / 0.70x, median 0.70" in t["detail"], t


def test_report_table_and_json_read_rows_by_field() -> None:
    """The printed table shows every row by kind (a floor row in calls/s, a failed row as not
    available), and results.json keeps each row's kind and fields."""
    rows: list[AnyRow] = [
        TOKEN,
        _call("unary SignDigest, 64 callers (h2load)", 700.0),
        _call("gRPC floor: GetPublicKey, 64 callers", 0.0, call=Call.FLOOR, calls_per_s=900.0),
        _call("round 2, bare stack: unary", 0.0, server=Server.BARE, round=2, not_available="x"),
    ]
    result = {
        "date": "today",
        "machine": {"cpus": 2, "note": "test"},
        "duration_per_config_s": 1.0,
        "targets": targets(rows),
    }
    text = table(result, rows)
    assert "gRPC floor: GetPublicKey, 64 callers" in text and "calls/s" in text
    assert "round 2, bare stack: unary" in text and "not available: x" in text
    assert "0.70" in text.split("unary SignDigest, 64 callers (h2load)")[1].split("\n")[0]
    dumped = json.loads(json.dumps([r.to_json() for r in rows], default=str))
    assert [d["kind"] for d in dumped] == ["TokenRow", "CallRow", "CallRow", "CallRow"]
    assert dumped[2]["call"] == "floor" and dumped[3]["server"] == "bare"
