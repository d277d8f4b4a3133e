"""The write-ahead order of an offline key change (server.audit.offline): intent on disk
before the change, no change without it, the outcome under the same request id, and a
change whose outcome was lost reported, not hidden. The change here is a callable that
returns what KeyAdmin would (the ceremony through a real token: tests/integration/
test_audit_offline.py); the chain is the real writer on a real file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsmsign.v1 import hsmsign_pb2 as pb
from server.audit.config import AuditConfig
from server.audit.offline import ChangeRefused, OfflineTrail
from server.audit.writer import ChainWriter
from server.errors import KeyNotFound

KEY = pb.Key(name="k", versions=[pb.KeyVersion(version=1, fingerprint="ab" * 32, primary=True)])


def _trail(directory: Path) -> tuple[ChainWriter, OfflineTrail]:
    w = ChainWriter(AuditConfig(directory=directory), "offline", "test", None, lambda ok: None)
    w.start()
    return w, OfflineTrail(w)


def _calls(directory: Path) -> list[dict[str, object]]:
    lines = (directory / "audit-offline.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "call"]


def test_the_intent_is_on_disk_before_the_change(tmp_path: Path) -> None:
    w, trail = _trail(tmp_path)
    seen: list[list[dict[str, object]]] = []

    def change(request: pb.CreateKeyRequest) -> pb.Key:
        seen.append(_calls(tmp_path))
        return KEY

    trail.change("CreateKey", pb.CreateKeyRequest(name="k"), change)
    w.stop()
    assert [(r["op"], r["outcome"]) for r in seen[0]] == [("CreateKey", "intent")]
    intent, outcome = _calls(tmp_path)
    assert intent["request_id"] == outcome["request_id"]
    assert (outcome["outcome"], outcome["key"], outcome["version"]) == ("ok", "k", 1)
    assert trail.unaudited == []


def test_no_intent_no_change(tmp_path: Path) -> None:
    w, trail = _trail(tmp_path)
    (tmp_path / "audit-offline.jsonl").unlink()  # the trail can no longer be written
    changed: list[bool] = []

    def change(request: pb.CreateKeyRequest) -> pb.Key:
        changed.append(True)
        return KEY

    with pytest.raises(ChangeRefused, match="CreateKey not made"):
        trail.change("CreateKey", pb.CreateKeyRequest(name="k"), change)
    w.stop()
    assert changed == []


def test_a_refused_change_has_its_outcome(tmp_path: Path) -> None:
    w, trail = _trail(tmp_path)

    def change(request: pb.KeyVersionRequest) -> pb.Key:
        raise KeyNotFound("no key 'k'")

    with pytest.raises(KeyNotFound):
        trail.change("DisableKeyVersion", pb.KeyVersionRequest(name="k", version=1), change)
    w.stop()
    outcome = _calls(tmp_path)[-1]
    assert (outcome["outcome"], outcome["status"], outcome["key"]) == (
        "refused",
        "NOT_FOUND",
        "k",
    )


def test_a_change_whose_outcome_is_lost_is_reported(tmp_path: Path) -> None:
    w, trail = _trail(tmp_path)

    def change(request: pb.RotateKeyRequest) -> pb.Key:
        (tmp_path / "audit-offline.jsonl").unlink()  # the trail fails during the change
        return KEY

    assert trail.change("RotateKey", pb.RotateKeyRequest(name="k"), change) is KEY
    w.stop()
    assert len(trail.unaudited) == 1 and "RotateKey of k@1 WAS MADE" in trail.unaudited[0]
