"""Reading one table of a TOML config, with errors that name the file and the dotted key.

Every part of the daemon's config ([token], [server], [keyring], [identities], [policy], ...)
is read through :class:`Table`, so a wrong type, a missing value or an unknown key gets the
same one-line message everywhere: ``FILE: table.key: got X; allowed: Y``.
"""

from __future__ import annotations

import platform
import sysconfig
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from server.errors import ConfigError

#: Debian's multiarch triplet (x86_64-linux-gnu, aarch64-linux-gnu, ...): ``${MULTIARCH}`` in
#: a config path, so that one config names /usr/lib/<triplet>/ on every architecture.
MULTIARCH = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"


class Table:
    """A TOML table that remembers its file and dotted name, and which keys were read."""

    def __init__(self, path: Path, name: str, data: Any) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: {name}: must be a table")
        self.path, self.name, self.data = path, name, data
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self._key(key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any, allowed: str) -> Any:
        """The value of ``key`` if it is a ``kind`` (an int is also a float; a bool is never
        a number), ``default`` when absent. Raises ConfigError naming ``allowed``."""
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(key, f"got {value!r}; allowed: {allowed}")
        return value

    def text(self, key: str, allowed: str) -> str:
        """A required, non-empty string."""
        value = self.get(key, str, None, allowed)
        if not value:
            raise self.error(key, f"is required: {allowed}")
        return str(value)

    def strings(self, key: str, allowed: str) -> tuple[str, ...]:
        """A required, non-empty list of non-empty strings."""
        value = self.get(key, list, None, allowed)
        if not value or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"got {value!r}; allowed: {allowed}")
        return tuple(value)

    def table(self, key: str) -> Table:
        """The sub-table ``key`` (empty when absent)."""
        self.used.add(key)
        return Table(self.path, self._key(key), self.data.get(key, {}))

    def tables(self, key: str) -> list[Table]:
        """The array of tables ``[[key]]`` (empty when absent)."""
        self.used.add(key)
        value = self.data.get(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"must be an array of tables: [[{self._key(key)}]]")
        return [Table(self.path, f"{self._key(key)}[{i}]", v) for i, v in enumerate(value)]

    def path_value(self, key: str) -> Path | None:
        """A file path; relative to the config file's directory; ``${MULTIARCH}`` stands for
        Debian's multiarch directory name (for PKCS#11 modules under /usr/lib/<triplet>/)."""
        value = self.get(key, str, None, "a file path")
        if value is None:
            return None
        p = Path(value.replace("${MULTIARCH}", MULTIARCH))
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def required_path(self, key: str) -> Path:
        value = self.path_value(key)
        if value is None:
            raise self.error(key, "is required (a file path)")
        return value

    def positive(self, key: str, kind: type, default: Any, maximum: float) -> Any:
        """A number above 0 and at most ``maximum``."""
        value = self.get(key, kind, default, f"a number from 1 to {maximum:g}")
        if not 0 < value <= maximum:
            raise self.error(
                key, f"got {value!r}; allowed: a number above 0 and at most {maximum:g}"
            )
        return value

    def number(self, key: str, default: float | None, allowed: str) -> float | None:
        """A number above 0 (at most 1e9), ``default`` when absent."""
        value = self.get(key, float, default, allowed)
        if value is not None and not 0 < value <= 1e9:
            raise self.error(key, f"got {value!r}; allowed: {allowed}")
        return float(value) if value is not None else None

    def finish(self) -> None:
        """Raises ConfigError for a key of this table that nothing read."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(
                unknown[0], f"unknown key; allowed here: {', '.join(sorted(self.used))}"
            )


def default_of(cls: type, name: str) -> Any:
    """The default of a config dataclass field: the one place defaults are written."""
    f = next(f for f in fields(cls) if f.name == name)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    raise KeyError(f"{cls.__name__}.{name} has no static default")
