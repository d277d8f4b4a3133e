"""``[audit]`` in the daemon config: where the trail goes, how files rotate, when checkpoints
are signed. Parsed here from the raw TOML table; ``server.config.load`` calls ``parse``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsmsign import keycommands
from server.errors import ConfigError


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail's settings (docs/adr/0006-audit-trail.md). ``directory`` None: no
    trail (only the human log); every other field then does nothing."""

    #: Directory of the chain files (``audit-<chain>.jsonl``); ``[audit] path``. Relative
    #: paths are relative to the config file's directory.
    directory: Path | None = None
    #: A chain file moves on to a new file once it reaches this size.
    rotate_bytes: int = 64 * 1024 * 1024  # [audit] rotate_mb, in MiB
    #: ... or once its first record is this many seconds old (``[audit] rotate_every``, e.g.
    #: "1d" or "6h"); None: by size only. The age is taken from the first record's time, so
    #: a restarted daemon keeps the schedule of the file it continues.
    rotate_seconds: float | None = None
    #: A checkpoint is signed after this many records ...
    checkpoint_records: int = 1000
    #: ... or this many seconds after the first record not yet covered, whichever comes first.
    checkpoint_seconds: float = 60.0
    #: Seconds between attempts to write again after a failure (health turns SERVING again
    #: on the first that succeeds).
    retry_seconds: float = 1.0
    #: Token label of the audit key (sign only, never in the key ring; made on first use).
    key_label: str = "hsmsign-audit:v1"

    @property
    def enabled(self) -> bool:
        return self.directory is not None


_MIB = 1024 * 1024

_ALLOWED = {
    "path": "a directory path",
    "rotate_mb": "megabytes, a number above 0",
    "rotate_every": 'a duration from 1s to 366d, e.g. "1d", "6h", "30m", or seconds',
    "checkpoint_records": "a whole number from 1 to 1000000",
    "checkpoint_seconds": "seconds, a number above 0 and at most 86400",
    "retry_seconds": "seconds, a number above 0 and at most 60",
    "key_label": "a token label",
}


def parse(table: Mapping[str, Any], config_path: Path) -> AuditConfig:
    """``AuditConfig`` from the raw ``[audit]`` table (empty: no trail). Raises ConfigError
    naming the file, the key and what is allowed."""

    def error(key: str, value: object) -> ConfigError:
        return ConfigError(f"{config_path}: audit.{key}: got {value!r}; allowed: {_ALLOWED[key]}")

    if not isinstance(table, Mapping):
        raise ConfigError(f"{config_path}: audit: must be a table")
    for key in table:
        if key not in _ALLOWED:
            raise ConfigError(
                f"{config_path}: audit.{key}: unknown key; allowed here: {', '.join(_ALLOWED)}"
            )

    def number(key: str, default: float, maximum: float, whole: bool = False) -> float:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise error(key, value)
        if whole and not isinstance(value, int):
            raise error(key, value)
        if not 0 < value <= maximum:
            raise error(key, value)
        return value

    path = table.get("path")
    if path is None:
        if table:
            raise ConfigError(f"{config_path}: audit.path: is required in [audit]")
        return AuditConfig()
    if not isinstance(path, str) or not path:
        raise error("path", path)
    d = AuditConfig()  # the defaults are the dataclass fields' (one place for each)
    directory = Path(path)
    if not directory.is_absolute():
        directory = (config_path.parent / directory).resolve()
    label = table.get("key_label", d.key_label)
    if not isinstance(label, str) or not label or label.startswith("hsmsign:"):
        # "hsmsign:" labels belong to the key ring: the audit key must never be in it.
        raise error("key_label", label)
    return AuditConfig(
        directory=directory,
        rotate_bytes=int(number("rotate_mb", d.rotate_bytes / _MIB, 1 << 20) * _MIB),
        rotate_seconds=_rotate_seconds(table.get("rotate_every"), error),
        checkpoint_records=int(
            number("checkpoint_records", d.checkpoint_records, 1_000_000, whole=True)
        ),
        checkpoint_seconds=float(number("checkpoint_seconds", d.checkpoint_seconds, 86400)),
        retry_seconds=float(number("retry_seconds", d.retry_seconds, 60)),
        key_label=label,
    )


#: ``rotate_every``'s bounds: a file a second is plenty for a test; a year, for anyone.
_ROTATE_MIN_SECONDS = 1.0
_ROTATE_MAX_SECONDS = 366 * 86400.0


def _rotate_seconds(value: object, error: Callable[[str, object], ConfigError]) -> float | None:
    """``rotate_every`` in seconds: "1d", "6h", "30m", "90s" or a number of seconds; None when
    unset. Raises ConfigError."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise error("rotate_every", value)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = keycommands.parse_duration(value)
        except keycommands.BadArguments:
            raise error("rotate_every", value) from None
    else:
        raise error("rotate_every", value)
    if not _ROTATE_MIN_SECONDS <= seconds <= _ROTATE_MAX_SECONDS:
        raise error("rotate_every", value)
    return seconds
