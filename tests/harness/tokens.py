"""SoftHSM2 token directories for tests: made fresh by softhsm/dev-token.sh (never the
developer's dev token), the daemon config that points at them, and the one parser of
``pkcs11-tool -O`` listings."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness.paths import PROXY_MODULE, REPO, SOFTHSM_MODULE

#: Where every test daemon listens unless a test names another local address: port 0, so the
#: kernel picks a free port and the daemon reports it through --ready-file.
TEST_LISTEN = "127.0.0.1:0"


@dataclass(frozen=True)
class P11Object:
    """One object of a ``pkcs11-tool -O`` listing: its kind (``Private Key``, ``Public Key``,
    ``Secret Key``, ``Data``), the words after the kind (``RSA``, ``RSA 2048 bits``) and its
    ``name: value`` fields."""

    kind: str
    detail: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.fields.get("label", "").strip("'")

    def words(self, name: str) -> frozenset[str]:
        """A comma-separated field (``Usage``, ``Access``) as a set of its entries."""
        value = self.fields.get(name, "")
        return frozenset(w.strip() for w in value.split(",") if w.strip() and w.strip() != "none")

    @property
    def usage(self) -> frozenset[str]:
        return self.words("Usage")

    @property
    def access(self) -> frozenset[str]:
        return self.words("Access")


_HEADER = re.compile(r"^(Private Key|Public Key|Secret Key|Certificate|Data) [Oo]bject;?\s*(.*)$")
_FIELD = re.compile(r"^\s+([A-Za-z][\w ]*?):\s*(.*)$")


def parse_objects(listing: str) -> list[P11Object]:
    """Every object in a ``pkcs11-tool -O`` (``--list-objects``) listing, in order.

    Raises ValueError on a field line before any object header."""
    objects: list[P11Object] = []
    for line in listing.splitlines():
        header = _HEADER.match(line)
        if header:
            objects.append(P11Object(header.group(1), header.group(2).strip()))
            continue
        found = _FIELD.match(line)
        if found:
            if not objects:
                raise ValueError(f"pkcs11-tool field before any object: {line!r}")
            objects[-1].fields.setdefault(found.group(1), found.group(2).strip())
    return objects


@dataclass
class TokenDir:
    """An isolated SoftHSM2 token: its softhsm2.conf, label and PIN file."""

    path: Path
    label: str

    @property
    def conf(self) -> Path:
        return self.path / "softhsm2.conf"

    @property
    def pin_file(self) -> Path:
        return self.path / "user.pin"

    @property
    def pin(self) -> str:
        return self.pin_file.read_text()

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def pkcs11_tool(self, *args: str) -> str:
        """Runs OpenSC's pkcs11-tool on this token, logged in; returns stdout.

        Raises subprocess.CalledProcessError if pkcs11-tool fails."""
        r = subprocess.run(
            [
                "pkcs11-tool",
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                self.label,
                "--login",
                "--pin",
                self.pin,
                *args,
            ],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return r.stdout

    def objects(self, kind: str | None = None) -> list[P11Object]:
        """The token's objects as pkcs11-tool lists them (only ``kind`` if given)."""
        listed = parse_objects(self.pkcs11_tool("--list-objects"))
        return [o for o in listed if kind is None or o.kind == kind]

    def object(self, kind: str, label: str) -> P11Object:
        """The one object of ``kind`` with ``label``. Raises LookupError if there is none."""
        for o in self.objects(kind):
            if o.label == label:
                return o
        raise LookupError(f"no {kind} object labelled {label!r} in token {self.label!r}")

    def labels(self, kind: str | None = None) -> set[str]:
        return {o.label for o in self.objects(kind)}


def make_token(path: Path, label: str = "hsmsign-test") -> TokenDir:
    """A new SoftHSM2 token in ``path`` (softhsm/dev-token.sh).

    Raises subprocess.CalledProcessError if the script fails."""
    subprocess.run(
        [str(REPO / "softhsm" / "dev-token.sh"), str(path), label],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return TokenDir(path, label)


#: The caller on this host may do everything, as in hsm_config/dev.toml: what test daemons
#: run with unless a test passes its own ``policy``.
LOCAL_GRANTS_ALL = """
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local"]
keys = ["*"]
operations = ["*"]
"""


def write_config(
    path: Path,
    token: TokenDir,
    *,
    module: str = PROXY_MODULE,
    extra_token: str = "",
    extra: str = "",
    pin_line: str | None = None,
    policy: str | None = None,
) -> Path:
    """An hsmsignd config for ``token``. ``extra`` goes before ``[token]`` (top-level keys and
    whole tables), ``extra_token`` inside it, ``policy`` at the end (default
    :data:`LOCAL_GRANTS_ALL`). The listen address is left to the command line:
    the harness always passes one (see daemons.py)."""
    pin = pin_line if pin_line is not None else f'pin_file = "{token.pin_file}"'
    path.write_text(f"""
log_level = "INFO"
{extra}
[token]
module = "{module}"
label = "{token.label}"
{pin}
sessions = 4
{extra_token}
[token.environment]
SOFTHSM2_CONF = "{token.conf}"
{LOCAL_GRANTS_ALL if policy is None else policy}""")
    return path


@dataclass(frozen=True)
class KeySpec:
    """A key to create with ``hsmsignd keys create`` when a test's token is made."""

    name: str
    purpose: str = "sign"
    algorithm: str = "rsa-2048"


def token_with_keys(
    root: Path,
    keys: Sequence[str | KeySpec] = (),
    *,
    label: str = "hsmsign-test",
    extra: str = "",
) -> tuple[TokenDir, Path]:
    """A token in ``root/token`` with ``keys`` created, and its config ``root/hsmsignd.toml``.

    Raises AssertionError if a key cannot be created."""
    from tests.harness.daemons import hsmsignd  # daemons imports this module

    token = make_token(root / "token", label)
    config = write_config(root / "hsmsignd.toml", token, extra=extra)
    for key in keys:
        spec = KeySpec(key) if isinstance(key, str) else key
        hsmsignd(
            config,
            "keys",
            "create",
            spec.name,
            "--purpose",
            spec.purpose,
            "--algorithm",
            spec.algorithm,
        )
    return token, config
