"""``[audit]`` in the daemon config: defaults, paths, and one clear error per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.audit.config import AuditConfig, parse
from server.config import load
from server.errors import ConfigError

CONFIG = Path("/etc/hsmsign/hsmsignd.toml")


def test_no_table_means_no_trail() -> None:
    assert parse({}, CONFIG) == AuditConfig()
    assert not AuditConfig().enabled


def test_relative_path_is_relative_to_the_config_file() -> None:
    c = parse({"path": "audit", "rotate_mb": 1, "checkpoint_records": 5}, CONFIG)
    assert c.directory == Path("/etc/hsmsign/audit")
    assert (c.rotate_bytes, c.checkpoint_records) == (1024 * 1024, 5)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("1d", 86400.0), ("6h", 21600.0), ("30m", 1800.0), ("2s", 2.0), (90, 90.0), (None, None)],
)
def test_rotate_every_is_a_duration(value: object, seconds: float | None) -> None:
    table = {"path": "a"} if value is None else {"path": "a", "rotate_every": value}
    assert parse(table, CONFIG).rotate_seconds == seconds


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"path": "a", "rotate_every": "soon"}, "audit.rotate_every: got 'soon'"),
        ({"path": "a", "rotate_every": "0s"}, "audit.rotate_every: got '0s'"),
        ({"path": "a", "rotate_every": "400d"}, "a duration from 1s to 366d"),
        ({"path": "a", "rotate_every": True}, "audit.rotate_every: got True"),
        ({"rotate_mb": 1}, "audit.path: is required"),
        ({"path": ""}, "audit.path: got ''"),
        ({"path": "a", "checkpoint_records": 0}, "audit.checkpoint_records: got 0"),
        ({"path": "a", "checkpoint_records": 1.5}, "a whole number"),
        ({"path": "a", "checkpoint_seconds": True}, "audit.checkpoint_seconds: got True"),
        ({"path": "a", "key_label": "hsmsign:demo:v1"}, "audit.key_label"),
        ({"path": "a", "colour": "red"}, "audit.colour: unknown key"),
    ],
)
def test_bad_values_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        parse(table, CONFIG)


def test_the_dev_config_writes_a_trail_under_softhsm_dev() -> None:
    repo = Path(__file__).resolve().parents[2]
    cfg = load(repo / "hsm_config" / "dev.toml")
    assert cfg.audit.directory == repo / "softhsm" / "dev" / "audit"
