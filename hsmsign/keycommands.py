"""The ``keys`` command vocabulary, shared by ``hsmsign keys`` and ``hsmsignd keys``.

Shared, I/O-free: the argparse actions, the checking of arguments and building of KeyAdmin
requests (:func:`prepare`), the one dispatch chain (:meth:`KeyCommand.run` over a
:class:`KeyBackend`) and the rendering of tables and JSON, which returns text. Each
executable supplies its backend (the gRPC KeyAdmin client, or the token itself offline),
reads files through the callables it passes in, and prints.

JSON shapes: ``list`` prints a list of version objects; ``create``, ``rotate`` and ``import``
print the new version's object (with its public key PEMs); the other actions and ``get``
print the key: ``{name, purpose, algorithm, primary_version, versions: [...]}``.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import key_wrap, names
from hsmsign.v1 import hsmsign_pb2 as pb

EXIT_USAGE: Final = 2
MIN_IMPORT_BITS: Final = 2048
_DURATION_RE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhd]?)$")
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_TIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
_VERSION_ACTIONS: Final = ("set-primary", "disable", "enable", "schedule-destroy", "cancel-destroy")


class BadArguments(ValueError):
    """Arguments that cannot work (exit code 2 in both executables); one line."""

    exit_code: Final = EXIT_USAGE


class KeyBackend(Protocol):
    """Who answers the KeyAdmin calls: the daemon over gRPC, or the token itself offline."""

    def ListKeys(self, request: pb.ListKeysRequest) -> pb.ListKeysResponse: ...
    def GetKey(self, request: pb.GetKeyRequest) -> pb.Key: ...
    def CreateKey(self, request: pb.CreateKeyRequest) -> pb.Key: ...
    def RotateKey(self, request: pb.RotateKeyRequest) -> pb.Key: ...
    def ImportKey(self, request: pb.ImportKeyRequest) -> pb.Key: ...
    def SetPrimaryVersion(self, request: pb.KeyVersionRequest) -> pb.Key: ...
    def DisableKeyVersion(self, request: pb.KeyVersionRequest) -> pb.Key: ...
    def EnableKeyVersion(self, request: pb.KeyVersionRequest) -> pb.Key: ...
    def ScheduleKeyVersionDestruction(self, request: pb.ScheduleDestructionRequest) -> pb.Key: ...
    def CancelKeyVersionDestruction(self, request: pb.KeyVersionRequest) -> pb.Key: ...


@dataclass(frozen=True)
class Output:
    """What a command prints: ``stdout`` for results, ``stderr`` for advice."""

    stdout: str
    stderr: str = ""


# -- arguments -----------------------------------------------------------------------------------


def add_actions(ks: Any, offline: bool = False) -> None:
    """The actions under ``keys`` (``ks`` is the subparsers object); ``offline`` adds
    ``ensure`` (for ``hsmsignd keys``: create unless it exists)."""

    def action(name: str, text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = ks.add_parser(name, help=text, description=text)
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    action("list", "list keys and their versions")
    action("get", "one key's versions, states and provenance").add_argument("name")
    creating = [("create", "generate version 1 of a new key in the token")]
    if offline:
        creating.append(("ensure", "like create, but succeed quietly if the key exists"))
    for name, text in creating:
        c = action(name, text)
        c.add_argument("name")
        _purpose_arg(c)
        c.add_argument(
            "--algorithm",
            choices=names.names(names.KEY_ALGORITHMS),
            default=names.DEFAULT_KEY_ALGORITHM,
            help="RSA size; Capgo requires rsa-2048 (default)",
        )
    r = action("rotate", "generate a new version of a key (its purpose and size)")
    r.add_argument("name")
    r.add_argument(
        "--no-primary",
        dest="make_primary",
        action="store_false",
        help="keep the current primary (default: the new version becomes primary)",
    )
    for name, text in (
        ("set-primary", "make a version the one used by requests that name only the key"),
        ("disable", "refuse a version for new operations (not the primary)"),
        ("enable", "allow a disabled version again"),
        ("cancel-destroy", "cancel a scheduled destruction (the version becomes disabled)"),
    ):
        a = action(name, text)
        a.add_argument("name")
        a.add_argument("version", type=int)
    d = action("schedule-destroy", "destroy a version's key objects in the token after a delay")
    d.add_argument("name")
    d.add_argument("version", type=int)
    d.add_argument(
        "--delay",
        default=None,
        metavar="DURATION",
        help="e.g. 24h (default), 7d, 30m; never below the daemon's minimum",
    )
    i = action(
        "import",
        "write an existing RSA private key (e.g. .capgo_key_v2) into the token as a new version",
    )
    i.add_argument("file", type=Path, help="PEM or DER, PKCS#1 or PKCS#8")
    i.add_argument("--name", required=True, help="key to add the version to (or create)")
    _purpose_arg(i)
    i.add_argument("--make-primary", action="store_true", help="make the imported version primary")
    i.add_argument(
        "--passphrase-file", type=Path, metavar="FILE", help="passphrase of an encrypted key"
    )
    if not offline:  # the offline import never crosses a network
        i.add_argument(
            "--plaintext-ceremony",
            action="store_true",
            help="send the key IN CLEAR (only to a daemon with server.allow_plaintext_import, "
            "on its admin socket: --server unix:PATH); the default wraps it to the daemon's "
            "import wrapping key",
        )


def _purpose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--purpose",
        choices=names.names(names.PURPOSES),
        default=names.DEFAULT_PURPOSE,
        help="sign or unwrap, never both (default: %(default)s)",
    )


#: google.protobuf.Duration's range; the daemon's own bound is lower and named in its answer.
MAX_DURATION_SECONDS = 315_576_000_000


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``24h``, ``7d`` in seconds. Raises BadArguments."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise BadArguments(f"bad duration {text!r}: use e.g. 0s, 30m, 24h or 7d")
    seconds = float(m["n"]) * _UNIT_SECONDS[m["unit"]]
    if seconds > MAX_DURATION_SECONDS:
        raise BadArguments(
            f"duration {text!r} is too long (a protobuf Duration holds 10,000 years)"
        )
    return seconds


# -- key files to import (the I/O is passed in) --------------------------------------------------

#: Reads a file's bytes (raises OSError).
ReadFile = Callable[[Path], bytes]
#: Asks for the passphrase of a key file, or is None where nobody can be asked.
AskPassphrase = Callable[[Path], bytes]


def load_private_key_file(
    path: Path,
    passphrase_file: Path | None,
    read: ReadFile,
    ask: AskPassphrase | None,
) -> bytes:
    """Reads a PEM or DER RSA private key (PKCS#1 or PKCS#8, encrypted or not) and returns it
    as unencrypted DER PKCS#8, for ImportKey. The passphrase of an encrypted key comes from
    ``passphrase_file`` or ``ask``. Raises BadArguments for anything else: unreadable, not a
    private key, not RSA (nor the rsaEncryption OID), e != 65537, under 2048 bits, encrypted
    with no passphrase."""
    try:
        data = read(path)
    except OSError as e:
        raise BadArguments(f"cannot read {path}: {e.strerror}") from None
    passphrase: bytes | None = None
    if passphrase_file is not None:
        try:
            passphrase = read(passphrase_file).rstrip(b"\r\n")
        except OSError as e:
            raise BadArguments(f"cannot read {passphrase_file}: {e.strerror}") from None
    pem = b"-----BEGIN" in data
    encrypted = pem and (b"ENCRYPTED" in data)
    if encrypted and passphrase is None:
        if ask is None:
            raise BadArguments(
                f"{path} is encrypted; give --passphrase-file FILE (or run on a terminal to be "
                "asked)"
            )
        passphrase = ask(path)
    if not encrypted:
        _check_input_algorithm(path, data, pem)
    load = serialization.load_pem_private_key if pem else serialization.load_der_private_key
    try:
        key = load(data, password=passphrase if encrypted else None)
    except TypeError:
        raise BadArguments(
            f"{path} is encrypted; give --passphrase-file FILE (or run on a terminal)"
        ) from None
    except ValueError:
        raise BadArguments(
            f"{path} is not a readable private key (PEM or DER, PKCS#1 or PKCS#8), or the "
            "passphrase is wrong"
        ) from None
    except Exception as e:  # cryptography raises its own types for unsupported formats
        raise BadArguments(f"{path} cannot be read as a private key ({type(e).__name__})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadArguments(
            f"{path} holds a {type(key).__name__.lstrip('_')}; only RSA keys can be imported"
        )
    if key.key_size < MIN_IMPORT_BITS:
        raise BadArguments(f"{path} is RSA-{key.key_size}; keys under 2048 bits are refused")
    try:
        key_wrap.check_public_key(key.public_key())
    except key_wrap.UnsuitableKey as e:
        raise BadArguments(f"{path}: {e}") from None
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_input_algorithm(path: Path, data: bytes, pem: bool) -> None:
    """Refuses an unencrypted PKCS#8 key whose algorithm is not rsaEncryption (an RSA-PSS
    key, for one): cryptography would load it as a plain RSA key and re-encode it."""
    if pem:
        if b"-----BEGIN PRIVATE KEY-----" not in data:
            return  # PKCS#1 ("RSA PRIVATE KEY") or another type cryptography names
        body = data.split(b"-----BEGIN PRIVATE KEY-----", 1)[1].split(b"-----END", 1)[0]
        try:
            der = base64.b64decode(b"".join(body.split()), validate=True)
        except ValueError:
            return  # cryptography's loader reports it
    else:
        der = data
    try:
        oid = key_wrap.pkcs8_algorithm_oid(der)
    except key_wrap.UnsuitableKey:
        return  # not PKCS#8 (DER PKCS#1, say): the loader decides
    if oid != key_wrap.RSA_ENCRYPTION_OID_DER:
        raise BadArguments(
            f"{path} is not an rsaEncryption key (RSA-PSS, or not RSA); only RSA keys "
            "with the rsaEncryption OID can be imported"
        )


def import_advice(path: Path) -> str:
    return (
        f"Check that the fingerprint or Capgo key_id above matches the public key your apps "
        f"ship, then destroy the key file: shred -u {path}\n"
    )


# -- rendering -----------------------------------------------------------------------------------


def _time(v: pb.KeyVersion, field: str) -> str | None:
    if not v.HasField(field):  # type: ignore[arg-type]
        return None
    text: str = getattr(v, field).ToDatetime().strftime(_TIME_FORMAT)
    return text


def version_json(key: pb.Key, v: pb.KeyVersion) -> dict[str, Any]:
    algorithm = names.by_pb(names.KEY_ALGORITHMS, key.algorithm)
    p = v.provenance
    return {
        "name": key.name,
        "version": v.version,
        "purpose": names.name_of(names.PURPOSES, key.purpose),
        "algorithm": algorithm.name if algorithm else names.UNSPECIFIED,
        "bits": algorithm.bits if algorithm else 0,
        "state": names.name_of(names.KEY_VERSION_STATES, v.state),
        "primary": v.primary,
        "created_at": _time(v, "created_at"),
        "destroy_at": _time(v, "destroy_at"),
        "fingerprint": v.fingerprint,
        "capgo_key_id": v.capgo_key_id,
        "provenance": {
            "imported": p.imported,
            "local": p.local,
            "never_extractable": p.never_extractable,
            "always_sensitive": p.always_sensitive,
            "extractable": p.extractable,
            "sensitive": p.sensitive,
        },
    }


def key_json(key: pb.Key) -> dict[str, Any]:
    return {
        "name": key.name,
        "purpose": names.name_of(names.PURPOSES, key.purpose),
        "algorithm": names.name_of(names.KEY_ALGORITHMS, key.algorithm),
        "primary_version": key.primary_version,
        "versions": [version_json(key, v) for v in key.versions],
    }


def _provenance(v: pb.KeyVersion) -> str:
    p = v.provenance
    if v.state == pb.KEY_VERSION_STATE_DESTROYED:
        return "-"
    words = ["imported" if p.imported else ("generated" if p.local else "not-local")]
    if p.extractable:
        words.append("EXTRACTABLE")
    elif p.never_extractable and p.always_sensitive:
        words.append("never-extractable")
    else:
        words.append("non-extractable")
    return ",".join(words)


def render_keys(keys: list[pb.Key], as_json: bool) -> str:
    """The key table (or a JSON list of versions)."""
    if as_json:
        return json.dumps([version_json(k, v) for k in keys for v in k.versions], indent=2) + "\n"
    if not keys:
        return "no keys\n"
    rows = [("KEY", "VER", "STATE", "PURPOSE", "ALGORITHM", "CREATED", "ORIGIN", "FINGERPRINT")]
    for k in keys:
        for v in k.versions:
            j = version_json(k, v)
            state = j["state"] + (f" (at {j['destroy_at']})" if j["destroy_at"] else "")
            rows.append(
                (
                    k.name,
                    f"{'*' if v.primary else ' '}v{v.version}",
                    state,
                    j["purpose"],
                    j["algorithm"],
                    j["created_at"] or "-",
                    _provenance(v),
                    f"sha256:{v.fingerprint[:16]}… keyid:{v.capgo_key_id}",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows
    ]
    return "\n".join([*lines, "(* = primary version)"]) + "\n"


def render_key(key: pb.Key, as_json: bool) -> str:
    return json.dumps(key_json(key), indent=2) + "\n" if as_json else render_keys([key], False)


def render_new_version(key: pb.Key, version: int, verb: str, as_json: bool) -> str:
    """The new version and its public key in the formats users paste."""
    v = next(x for x in key.versions if x.version == version)
    if as_json:
        body = {**version_json(key, v), "spki_pem": v.spki_pem, "pkcs1_pem": v.pkcs1_pem}
        return json.dumps({**body, "created": True}, indent=2) + "\n"
    role = "primary" if v.primary else f"not primary; primary is v{key.primary_version}"
    algorithm = names.name_of(names.KEY_ALGORITHMS, key.algorithm)
    return (
        f"{verb} {key.name} v{v.version} ({algorithm}, {role})\n"
        f"fingerprint: sha256:{v.fingerprint}\n"
        f"Capgo key_id: {v.capgo_key_id}\n"
        "\nPublic key (PEM, SubjectPublicKeyInfo):\n"
        f"{v.spki_pem}"
        "\nCapgo publicKey (capacitor.config: plugins.CapacitorUpdater.publicKey):\n"
        f"{v.pkcs1_pem}"
    )


def render_existing(key: pb.Key, as_json: bool) -> str:
    """``ensure`` on a key that exists: its primary version, one line (or JSON)."""
    v = next(x for x in key.versions if x.version == key.primary_version)
    if as_json:
        return json.dumps({**version_json(key, v), "created": False}) + "\n"
    j = version_json(key, v)
    return (
        f"exists: {key.name} v{v.version} RSA-{j['bits']} {j['purpose']} "
        f"sha256:{v.fingerprint} capgo key_id {v.capgo_key_id}\n"
    )


def _newest(key: pb.Key) -> int:
    return max(v.version for v in key.versions)


# -- the one dispatch chain ----------------------------------------------------------------------


@dataclass(frozen=True)
class KeyCommand:
    """A command whose arguments were checked and whose request is built; run it on a
    backend only then (so a bad argument never opens the token or a connection)."""

    action: str
    request: Any
    as_json: bool
    advice: str = ""

    def run(self, backend: KeyBackend) -> Output:
        """Send the request and render the answer. Raises whatever the backend raises."""
        a, req, as_json = self.action, self.request, self.as_json
        if a == "list":
            return Output(render_keys(list(backend.ListKeys(req).keys), as_json))
        if a == "get":
            return Output(render_key(backend.GetKey(req), as_json))
        if a == "ensure":
            existing = [
                k for k in backend.ListKeys(pb.ListKeysRequest()).keys if k.name == req.name
            ]
            if existing and existing[0].primary_version:
                return Output(render_existing(existing[0], as_json))
            a = "create"
        if a in ("create", "rotate", "import"):
            new_version_calls: dict[str, Callable[[Any], pb.Key]] = {
                "create": backend.CreateKey,
                "rotate": backend.RotateKey,
                "import": backend.ImportKey,
            }
            key = new_version_calls[a](req)
            verb = {"create": "created", "rotate": "rotated", "import": "imported as"}[a]
            return Output(render_new_version(key, _newest(key), verb, as_json), self.advice)
        version_calls: dict[str, Callable[[Any], pb.Key]] = {
            "set-primary": backend.SetPrimaryVersion,
            "disable": backend.DisableKeyVersion,
            "enable": backend.EnableKeyVersion,
            "schedule-destroy": backend.ScheduleKeyVersionDestruction,
            "cancel-destroy": backend.CancelKeyVersionDestruction,
        }
        return Output(render_key(version_calls[a](req), as_json))


def prepare(args: argparse.Namespace, read: ReadFile, ask: AskPassphrase | None) -> KeyCommand:
    """Check the parsed ``keys`` arguments and build the request (reading an import's key
    file through ``read``). Raises BadArguments."""
    a: str = args.keys_command
    as_json: bool = args.json
    request: Any
    advice = ""
    if a == "list":
        request = pb.ListKeysRequest()
    elif a == "get":
        request = pb.GetKeyRequest(name=args.name)
    elif a in ("create", "ensure"):
        request = pb.CreateKeyRequest(
            name=args.name,
            purpose=names.by_name(names.PURPOSES, args.purpose, "purpose").pb,
            algorithm=names.by_name(names.KEY_ALGORITHMS, args.algorithm, "algorithm").pb,
        )
    elif a == "rotate":
        request = pb.RotateKeyRequest(name=args.name, make_primary=args.make_primary)
    elif a == "import":
        der = load_private_key_file(args.file, args.passphrase_file, read, ask)
        request = pb.ImportKeyRequest(
            name=args.name,
            purpose=names.by_name(names.PURPOSES, args.purpose, "purpose").pb,
            private_key_der=der,
            make_primary=args.make_primary,
        )
        del der
        advice = import_advice(args.file)
    elif a in _VERSION_ACTIONS:
        version: int = args.version
        if version < 1:
            raise BadArguments("version must be 1 or more")
        if a == "schedule-destroy":
            request = pb.ScheduleDestructionRequest(name=args.name, version=version)
            if args.delay is not None:
                request.delay.FromNanoseconds(int(parse_duration(args.delay) * 1e9))
        else:
            request = pb.KeyVersionRequest(name=args.name, version=version)
    else:
        raise BadArguments(f"unknown keys action {a!r}")
    return KeyCommand(a, request, as_json, advice)
