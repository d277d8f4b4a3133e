"""The audit trail's chain and checkpoints: the writer's files verify, and every kind of
tampering is found and named. The checkpointer signs with an RSA key in software here (the
daemon's is in the token: tests/integration/test_audit_daemon.py)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from hsmsign import auditlog, keyformats
from server.audit.config import AuditConfig
from server.audit.writer import ChainWriter, Checkpointer
from tests.harness import HSMSIGN

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def checkpointer(key: rsa.RSAPrivateKey = KEY) -> Checkpointer:
    def sign(digest: bytes) -> bytes:
        return key.sign(
            digest,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            utils.Prehashed(hashes.SHA256()),
        )

    return Checkpointer(keyformats.fingerprint(key.public_key()), sign)


def write_chain(directory: Path, calls: int = 30, **settings: int) -> ChainWriter:
    config = AuditConfig(directory=directory, checkpoint_records=10, **settings)  # type: ignore[arg-type]
    health: list[bool] = []
    w = ChainWriter(config, "1", "test/1/0", checkpointer(), health.append)
    w.start()
    for i in range(calls):
        w.append({"kind": "call", "op": "SignDigest", "time": auditlog.utc_now(), "n": i})
        if (i + 1) % 10 == 0:
            w.checkpoint("records")
    w.stop()
    assert health == []
    return w


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def report(directory: Path, key: rsa.RSAPrivateKey = KEY) -> auditlog.Report:
    return auditlog.verify([directory], key.public_key())


def only_problem(r: auditlog.Report) -> auditlog.Problem:
    problems = [p for c in r.chains for p in c.problems]
    assert len(problems) == 1, problems
    return problems[0]


def test_an_untouched_chain_verifies(tmp_path: Path) -> None:
    write_chain(tmp_path)
    r = report(tmp_path)
    assert r.intact, r.to_json()
    assert r.chains[0].records > 30 and r.chains[0].unsigned_tail == 0


def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    write_chain(tmp_path, calls=60, rotate_bytes=2000)
    rotated = sorted(tmp_path.glob("audit-1.0*.jsonl"))
    assert len(rotated) >= 3
    first = json.loads(lines(rotated[1])[0])
    last_of_previous = lines(rotated[0])[-1].rstrip(b"\n")
    assert first["prev"] == auditlog.line_hash(last_of_previous)
    assert report(tmp_path).intact


def _append(w: ChainWriter, n: int) -> None:
    for i in range(n):
        w.append({"kind": "call", "op": "SignDigest", "time": auditlog.utc_now(), "n": i})


def _time_writer(directory: Path, seconds: float) -> ChainWriter:
    config = AuditConfig(directory=directory, checkpoint_records=10, rotate_seconds=seconds)
    w = ChainWriter(config, "1", "test/1/0", checkpointer(), lambda ok: None)
    w.start()
    return w


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_rotation_by_time_keeps_one_chain_across_files(tmp_path: Path) -> None:
    w = _time_writer(tmp_path, 1.0)
    _append(w, 3)
    time.sleep(1.1)
    _append(w, 3)  # the file's first record is over a second old: a new file first
    time.sleep(1.1)
    _append(w, 3)
    w.stop()
    rotated = sorted(tmp_path.glob("audit-1.0*.jsonl"))
    assert len(rotated) >= 2
    first = json.loads(lines(rotated[1])[0])
    assert first["prev"] == auditlog.line_hash(lines(rotated[0])[-1].rstrip(b"\n"))
    r = report(tmp_path)
    assert r.intact, r.to_json()
    assert len([rec for rec in auditlog.read([tmp_path]) if rec["kind"] == "call"]) == 9


def test_an_idle_chain_rotates_on_time_and_a_dropped_file_is_named(tmp_path: Path) -> None:
    w = _time_writer(tmp_path, 1.0)
    _append(w, 2)
    # Nothing appended: the writer's own thread moves the file aside once it is due.
    _wait_for(lambda: bool(list(tmp_path.glob("audit-1.000001.jsonl"))), "a rotation")
    _append(w, 2)
    _wait_for(lambda: bool(list(tmp_path.glob("audit-1.000002.jsonl"))), "a second rotation")
    _append(w, 2)
    w.stop()
    assert report(tmp_path).intact
    (tmp_path / "audit-1.000001.jsonl").unlink()
    problem = only_problem(report(tmp_path))
    assert "missing" in problem.message and "rotated file dropped" in problem.message


def test_a_restarted_writer_keeps_the_files_age(tmp_path: Path) -> None:
    w = _time_writer(tmp_path, 3600.0)
    _append(w, 2)
    w.stop()
    time.sleep(1.1)
    # The file it continues began over a second ago: due at once with a 1 s period.
    w = _time_writer(tmp_path, 1.0)
    _append(w, 1)
    w.stop()
    rotated = sorted(tmp_path.glob("audit-1.0*.jsonl"))
    assert len(rotated) >= 1
    assert report(tmp_path).intact


def _edit_field(p: Path) -> None:
    ls = lines(p)
    ls[5] = ls[5].replace(b'"n":3', b'"n":4')
    p.write_bytes(b"".join(ls))


def _delete(p: Path) -> None:
    ls = lines(p)
    del ls[5]
    p.write_bytes(b"".join(ls))


def _swap(p: Path) -> None:
    ls = lines(p)
    ls[5], ls[6] = ls[6], ls[5]
    p.write_bytes(b"".join(ls))


def _insert(p: Path) -> None:
    ls = lines(p)
    ls.insert(5, ls[4])
    p.write_bytes(b"".join(ls))


def _cut_tail(p: Path) -> None:
    # Cut off the last checkpoint and what follows: the checkpoints file still has it.
    ls = lines(p)
    p.write_bytes(b"".join(ls[:-8]))


def _cut_mid_line(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-40])


def _rewrite_without_checkpoints(p: Path) -> None:
    # A valid-looking chain: every seq and prev recomputed, no checkpoint (none can be made).
    prev, out = auditlog.GENESIS, []
    for seq, raw in enumerate(r for r in lines(p) if b'"checkpoint"' not in r):
        rec = json.loads(raw)
        rec.update(seq=seq, prev=prev)
        line = auditlog.encode(rec)
        prev = auditlog.line_hash(line)
        out.append(line + b"\n")
    p.write_bytes(b"".join(out))
    p.with_name("audit-1.checkpoints.jsonl").unlink()


def _rewrite_with_forged_checkpoints(p: Path) -> None:
    # The same, with checkpoints signed by a key that is not the audit key, claiming its
    # fingerprint.
    prev, out = auditlog.GENESIS, []
    forger = checkpointer(OTHER_KEY)
    for seq, raw in enumerate(lines(p)):
        rec = json.loads(raw)
        rec.update(seq=seq, prev=prev)
        if rec["kind"] == "checkpoint":
            digest = auditlog.checkpoint_digest("1", seq - 1, prev, rec["time"])
            rec["signature"] = forger.sign(digest).hex()
        line = auditlog.encode(rec)
        prev = auditlog.line_hash(line)
        out.append(line + b"\n")
    p.write_bytes(b"".join(out))
    p.with_name("audit-1.checkpoints.jsonl").unlink()


TAMPERING: list[tuple[str, Callable[[Path], None], str, int | None]] = [
    ("edit a field", _edit_field, "prev does not match", 6),
    ("delete a record", _delete, "records 5..5 are missing", 6),
    ("swap two records", _swap, "are missing", 6),
    ("insert a record", _insert, "reordered or inserted", 4),
    ("truncate the tail", _cut_tail, "the tail was cut", None),
    ("cut the last line short", _cut_mid_line, "cut short", None),
    ("rewrite without checkpoints", _rewrite_without_checkpoints, "no valid checkpoint", None),
    ("rewrite with forged checkpoints", _rewrite_with_forged_checkpoints, "does not verify", 1),
]


@pytest.mark.parametrize(
    ("change", "expected", "seq"),
    [(c, e, s) for _, c, e, s in TAMPERING],
    ids=[name for name, *_ in TAMPERING],
)
def test_tampering_is_found_and_named(
    tmp_path: Path, change: Callable[[Path], None], expected: str, seq: int | None
) -> None:
    write_chain(tmp_path)
    change(tmp_path / "audit-1.jsonl")
    problem = only_problem(report(tmp_path))
    assert expected in problem.message
    if seq is not None:  # None: the place is a file, or a checkpoint in the checkpoints file
        assert problem.seq == seq


def test_a_dropped_rotated_file_is_named(tmp_path: Path) -> None:
    write_chain(tmp_path, calls=60, rotate_bytes=2000)
    dropped = sorted(tmp_path.glob("audit-1.0*.jsonl"))[1]
    dropped.unlink()
    problem = only_problem(report(tmp_path))
    assert "missing" in problem.message and "rotated file dropped" in problem.message


def test_another_public_key_does_not_verify(tmp_path: Path) -> None:
    write_chain(tmp_path)
    problem = only_problem(report(tmp_path, OTHER_KEY))
    assert "not the given public key" in problem.message


def test_writer_continues_the_chain_after_a_restart(tmp_path: Path) -> None:
    write_chain(tmp_path, calls=5)
    write_chain(tmp_path, calls=5)
    r = report(tmp_path)
    assert r.intact, r.to_json()
    assert [rec["op"] for rec in auditlog.read([tmp_path])].count("audit_opened") == 2


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HSMSIGN, *args], capture_output=True, text=True, timeout=60)


def test_cli_exit_codes_and_show_filters(tmp_path: Path) -> None:
    write_chain(tmp_path)
    pem = tmp_path / "key.pem"
    pem.write_text(keyformats.spki_pem(KEY.public_key()))
    ok = _cli("audit", "verify", str(tmp_path), "--public-key", str(pem), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["intact"] is True
    _edit_field(tmp_path / "audit-1.jsonl")
    bad = _cli("audit", "verify", str(tmp_path), "--public-key", str(pem))
    assert bad.returncode == 3
    assert "NOT INTACT" in bad.stdout and "audit-1.jsonl:6 (seq 5)" in bad.stdout
    assert _cli("audit", "verify", str(tmp_path / "nothing")).returncode == 1
    assert _cli("audit", "verify", str(tmp_path), "--public-key", "/etc/hostname").returncode == 2
    assert _cli("audit", "verify").returncode == 2
    shown = _cli("audit", "show", str(tmp_path), "--operation", "SignDigest", "--json")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 30
    none = _cli("audit", "show", str(tmp_path), "--since", "2999-01-01", "--json")
    assert none.returncode == 0 and none.stdout == ""
    assert _cli("audit", "show", str(tmp_path), "--since", "yesterday").returncode == 2


def test_two_replicas_trails_verify_together_chain_by_chain(tmp_path: Path) -> None:
    """Replicas each keep chain 1 in their own directory (docs/high-availability.md): one
    verify over both directories checks each chain on its own. Before, chains were grouped by
    name across the paths, so two intact trails read as one broken chain (exit 3)."""
    a, b = tmp_path / "replica-a", tmp_path / "replica-b"
    a.mkdir()
    b.mkdir()
    write_chain(a, calls=20)
    write_chain(b, calls=30)
    r = auditlog.verify([a, b], KEY.public_key())
    assert [p for c in r.chains for p in c.problems] == []
    assert sorted(c.records for c in r.chains)[-1] >= 30 and len(r.chains) == 2
    names = sorted(c.chain for c in r.chains)
    assert all(str(tmp_path) in n for n in names), names  # each says which directory it is
    # One directory alone is named as before: by its chain.
    assert [c.chain for c in report(a).chains] == ["1"]


def test_a_checkpoint_is_signed_on_time_when_records_are_few(tmp_path: Path) -> None:
    """Fewer records than checkpoint_records: the background thread still signs them within
    checkpoint_seconds, so a quiet daemon's last records do not stay unsigned."""
    config = AuditConfig(directory=tmp_path, checkpoint_records=1000, checkpoint_seconds=0.3)
    health: list[bool] = []
    w = ChainWriter(config, "1", "test/1/0", checkpointer(), health.append)
    w.start()
    try:
        for i in range(3):
            w.append({"kind": "call", "op": "SignDigest", "time": auditlog.utc_now(), "n": i})
        _wait_for(lambda: report(tmp_path).chains[0].unsigned_tail == 0, "a checkpoint on time")
    finally:
        w.stop()
    r = report(tmp_path)
    assert r.intact and r.chains[0].records >= 3
    assert health == []
