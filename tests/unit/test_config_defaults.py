"""The config's defaults live on the dataclass fields, and the annotated example agrees.

Every key the example shows (set or commented out) is a field of the config dataclasses, and
every line marked ``# default`` carries the field's default. Also: the one loader fills every
default from the fields, the former name ``server.workers`` is still read, and the default
config path works without a source tree.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from server import config
from server.audit.config import AuditConfig
from server.errors import ConfigError
from server.limitsconfig import ConnectionLimits
from server.tomltable import default_of

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "hsm_config" / "production.example.toml"

_SECTION = re.compile(r"^#?\s*\[([A-Za-z0-9_.-]+)\]\s*$")
_KEY = re.compile(r"^(#\s)?([a-z][a-z0-9_]*)\s*=\s*(.+)$")


def _names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


#: TOML table -> (dataclass, keys of the table that are not field names, fields not keys).
TABLES: dict[str, tuple[type, set[str], set[str]]] = {
    "": (
        config.Config,
        set(),
        {"path", "token", "server", "keyring", "keys", "access", "audit"},
    ),
    "token": (config.TokenConfig, {"pin_file", "pin_env", "pin_credential", "uri"}, {"pin"}),
    "server": (config.ServerConfig, set(), {"tls"}),
    "server.tls": (config.TlsConfig, set(), set()),
    "server.limits": (ConnectionLimits, set(), set()),
    "keyring": (config.KeyRingConfig, set(), set()),
    "keys.*": (config.KeyOptions, set(), set()),
    # [audit] path, rotate_mb and rotate_every are the fields directory, rotate_bytes and
    # rotate_seconds, in other units.
    "audit": (
        AuditConfig,
        {"path", "rotate_mb", "rotate_every"},
        {"directory", "rotate_bytes", "rotate_seconds"},
    ),
}
#: Defaults that depend on other values: the example may mark only these literals.
DERIVED_DEFAULTS: dict[tuple[str, str], Any] = {("server", "processes"): config.PROCESSES_AUTO}


def _table(section: str) -> str | None:
    if section.startswith("keys."):
        return "keys.*"
    if section == "token.environment":
        return None  # free-form: environment variables
    if section.split(".")[0] in ("identities", "policy"):
        return None  # [identities] and [policy]: server.policy.config, tests/unit/test_policy.py
    return section


def _example_keys() -> list[tuple[str, str, Any, bool]]:
    """(table, key, value, marked as default) for every key line, set or commented out."""
    out = []
    section = ""
    for line in EXAMPLE.read_text().splitlines():
        m = _SECTION.match(line)
        if m:
            section = m[1]
            continue
        m = _KEY.match(line)
        if not m:
            continue
        table = _table(section)
        if table is None:
            continue
        text = f"{m[2]} = {m[3]}"
        value = tomllib.loads(text)[m[2]]
        out.append((table, m[2], value, text.rstrip().endswith("# default")))
    return out


def test_every_key_in_the_example_is_a_config_field() -> None:
    keys = _example_keys()
    assert len(keys) > 20  # the parser found the example's keys
    for table, key, _value, _marked in keys:
        cls, extra, not_keys = TABLES[table]
        allowed = (_names(cls) - not_keys) | extra
        assert key in allowed, f"[{table}] {key} in the example is not a field of {cls.__name__}"


def test_every_marked_default_is_the_field_default() -> None:
    marked = [(t, k, v) for t, k, v, is_default in _example_keys() if is_default]
    assert len(marked) >= 8
    for table, key, value in marked:
        if (table, key) in DERIVED_DEFAULTS:
            assert value == DERIVED_DEFAULTS[table, key], f"[{table}] {key}"
            continue
        cls, _extra, _not_keys = TABLES[table]
        assert value == default_of(cls, key), f"[{table}] {key} = {value!r}"


def test_every_field_with_a_default_is_explained_in_the_example() -> None:
    shown = {(t, k) for t, k, _v, _m in _example_keys()}
    # A field that is a table ([token.environment]) is shown by its section header.
    for line in EXAMPLE.read_text().splitlines():
        m = _SECTION.match(line)
        if m and "." in m[1]:
            parent, _, child = m[1].rpartition(".")
            shown.add((parent, child))
    for table, (cls, _extra, not_keys) in TABLES.items():
        for f in dataclasses.fields(cls):
            if f.name in not_keys:
                continue
            assert (table, f.name) in shown, f"[{table}] {f.name} is not in the example"


def test_the_example_loads() -> None:
    cfg = config.load(EXAMPLE)
    assert cfg.server.threads == 16 and cfg.token.sessions == 8


def _minimal(tmp_path: Path, server: str = "") -> Path:
    pin = tmp_path / "pin"
    pin.write_text("1234")
    pin.chmod(0o600)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[token]\nmodule = "/nonexistent/p11-kit-proxy.so"\nlabel = "t"\n'
        f'pin_file = "{pin}"\n[server]\nprocesses = 1\n{server}'
    )
    return path


def test_unset_keys_take_the_field_defaults(tmp_path: Path) -> None:
    cfg = config.load(_minimal(tmp_path))
    for cls, value in (
        (config.KeyRingConfig, cfg.keyring),
        (config.KeyOptions, cfg.key_options("any")),
    ):
        for f in dataclasses.fields(cls):
            assert getattr(value, f.name) == default_of(cls, f.name)
    for name in ("listen", "max_concurrent_calls", "grace_seconds", "reflection", "key_admin"):
        assert getattr(cfg.server, name) == default_of(config.ServerConfig, name)
    for name in ("sessions", "session_wait_seconds", "serial"):
        assert getattr(cfg.token, name) == default_of(config.TokenConfig, name)
    assert cfg.log_level == default_of(config.Config, "log_level")
    # The derived ones, by their one rule each.
    assert cfg.server.threads == config.default_threads(cfg.token.sessions)
    assert cfg.token.threading == "parallel"  # p11-kit-proxy.so locks for itself


@pytest.mark.parametrize(("line", "threads"), [("threads = 6", 6), ("workers = 7", 7)])
def test_threads_and_its_former_name(tmp_path: Path, line: str, threads: int) -> None:
    assert config.load(_minimal(tmp_path, line + "\n")).server.threads == threads


def test_threads_and_workers_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="former name of threads"):
        config.load(_minimal(tmp_path, "threads = 6\nworkers = 7\n"))


def test_the_default_config_path_needs_no_source_tree(tmp_path: Path) -> None:
    installed = tmp_path / "site-packages" / "hsm_config" / "dev.toml"  # not there
    assert config.default_config_path({}, installed) == config.INSTALLED_CONFIG
    assert config.default_config_path({"HSMSIGN_CONFIG": "/x.toml"}, installed) == Path("/x.toml")
    checkout = REPO / "hsm_config" / "dev.toml"
    assert config.default_config_path({}, checkout) == checkout
