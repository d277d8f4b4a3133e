"""The app project side of Capgo: a bundle zip from a web build, and capacitor.config."""

from __future__ import annotations

import hashlib
import json
import stat
import zipfile
from pathlib import Path
from typing import Final

from hsmsign._internal.aescbc import CHUNK_BYTES
from hsmsign._internal.files import atomic_output
from hsmsign.capgo.delta import walk_files
from hsmsign.capgo.format import BundleFormatError, CapgoError, load_capgo_public_key
from hsmsign.errors import UsageError

_ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)
_ZIP_LEVEL: Final = 6
_CODE_CONFIG_SUFFIXES: Final = (".ts", ".js", ".mjs", ".cjs")


class CapacitorConfigError(CapgoError, UsageError):
    """capacitor.config cannot be updated automatically."""


def _bundle_root(web_dir: Path) -> Path:
    entries = list(web_dir.iterdir())
    if (web_dir / "index.html").is_file():
        return web_dir
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / "index.html").is_file():
        return web_dir
    raise BundleFormatError(
        f"{web_dir}: index.html must be at the root of the web build or inside its single "
        "top-level folder (capacitor-updater refuses other layouts)"
    )


def default_zip_path(web_dir: Path) -> Path:
    """``DIR.zip`` beside the web build (``.`` and ``www/`` included). Raises
    BundleFormatError for a folder with no name (``/``)."""
    resolved = Path(web_dir).resolve()
    if not resolved.name:
        raise BundleFormatError(f"{web_dir} has no name to call the zip after; give -o FILE")
    return resolved.with_name(resolved.name + ".zip")


def make_bundle_zip(web_dir: Path, out: Path) -> str:
    """Zip a web build deterministically (sorted, fixed timestamps) for Capgo.

    Returns the SHA-256 hex of the zip. Refuses a layout the plugin cannot install and
    writes out atomically. Raises BundleFormatError, UsageError (no such output folder),
    OSError.
    """
    web_dir, out = Path(web_dir), Path(out)
    if not web_dir.is_dir():
        raise BundleFormatError(f"{web_dir} is not a folder")
    root = _bundle_root(web_dir)
    files = walk_files(root)
    if out.resolve().is_relative_to(web_dir.resolve()):
        raise BundleFormatError(f"the zip {out} must not be inside the web build {web_dir}")
    digest = hashlib.sha256()
    with atomic_output(out) as f:
        with zipfile.ZipFile(
            f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL
        ) as z:
            for p in files:
                info = zipfile.ZipInfo(p.relative_to(root).as_posix(), _ZIP_EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                with p.open("rb") as src, z.open(info, "w") as dst:
                    while chunk := src.read(CHUNK_BYTES):
                        dst.write(chunk)
        f.flush()
        f.seek(0)
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _detect_indent(text: str) -> int | str:
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" \t")
        if stripped and stripped != line:
            ws = line[: len(line) - len(stripped)]
            return ws if "\t" in ws else len(ws)
    return 2


def set_capacitor_public_key(config_path: Path, pem: str) -> None:
    """Write pem into ``plugins.CapacitorUpdater.publicKey`` of a capacitor.config.json.

    Keeps the other keys, their order and the indentation; atomic. Raises
    CapacitorConfigError for .ts/.js configs (with the value to paste by hand), a missing or
    unreadable file and invalid JSON; BundleFormatError for a key that is not PKCS#1 RSA-2048.
    """
    config_path = Path(config_path)
    load_capgo_public_key(pem)
    value = pem.strip()
    if config_path.suffix in _CODE_CONFIG_SUFFIXES:
        raise CapacitorConfigError(
            f"{config_path} is code, not JSON: paste this by hand as "
            f"plugins.CapacitorUpdater.publicKey:\n{json.dumps(value)}"
        )
    try:
        text = config_path.read_text(encoding="utf-8")
        mode = stat.S_IMODE(config_path.stat().st_mode)
    except (OSError, UnicodeDecodeError) as e:
        raise CapacitorConfigError(
            f"cannot read {config_path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CapacitorConfigError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CapacitorConfigError(f"{config_path}: top level must be a JSON object")
    plugins = data.setdefault("plugins", {})
    if not isinstance(plugins, dict):
        raise CapacitorConfigError(f"{config_path}: 'plugins' must be an object")
    updater = plugins.setdefault("CapacitorUpdater", {})
    if not isinstance(updater, dict):
        raise CapacitorConfigError(f"{config_path}: 'plugins.CapacitorUpdater' must be an object")
    updater["publicKey"] = value
    out = json.dumps(data, indent=_detect_indent(text), ensure_ascii=False)
    if text.endswith("\n"):
        out += "\n"
    with atomic_output(config_path, mode) as f:
        f.write(out.encode("utf-8"))
