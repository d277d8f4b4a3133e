"""Key administration through hsmsignd's KeyAdmin service, and reading key files to import.

Used by ``hsmsign keys ...`` and by scripts. Every call raises
:class:`hsmsign.errors.RemoteError` with the daemon's status and one-line message.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign.client import Client
from hsmsign.errors import UsageError
from hsmsign.v1 import hsmsign_pb2 as pb

PURPOSES: dict[str, pb.KeyPurpose.ValueType] = {
    "sign": pb.KEY_PURPOSE_SIGN,
    "unwrap": pb.KEY_PURPOSE_UNWRAP,
}
KEY_ALGORITHMS: dict[str, pb.KeyAlgorithm.ValueType] = {
    "rsa-2048": pb.KEY_ALGORITHM_RSA_2048,
    "rsa-3072": pb.KEY_ALGORITHM_RSA_3072,
    "rsa-4096": pb.KEY_ALGORITHM_RSA_4096,
}


class KeyAdmin:
    """Typed wrapper over the KeyAdmin stub of a :class:`Client`."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list_keys(self) -> list[pb.Key]:
        r = self._c.call(
            lambda: self._c.admin.ListKeys(pb.ListKeysRequest(), timeout=self._c.timeout)
        )
        return list(r.keys)

    def get_key(self, name: str) -> pb.Key:
        req = pb.GetKeyRequest(name=name)
        return self._c.call(lambda: self._c.admin.GetKey(req, timeout=self._c.timeout))

    def create_key(self, name: str, purpose: str = "sign", algorithm: str = "rsa-2048") -> pb.Key:
        req = pb.CreateKeyRequest(
            name=name, purpose=PURPOSES[purpose], algorithm=KEY_ALGORITHMS[algorithm]
        )
        return self._c.call(lambda: self._c.admin.CreateKey(req, timeout=120))

    def rotate_key(self, name: str, make_primary: bool = False) -> pb.Key:
        req = pb.RotateKeyRequest(name=name, make_primary=make_primary)
        return self._c.call(lambda: self._c.admin.RotateKey(req, timeout=120))

    def set_primary(self, name: str, version: int) -> pb.Key:
        req = pb.KeyVersionRequest(name=name, version=version)
        return self._c.call(lambda: self._c.admin.SetPrimaryVersion(req, timeout=self._c.timeout))

    def disable(self, name: str, version: int) -> pb.Key:
        req = pb.KeyVersionRequest(name=name, version=version)
        return self._c.call(lambda: self._c.admin.DisableKeyVersion(req, timeout=self._c.timeout))

    def enable(self, name: str, version: int) -> pb.Key:
        req = pb.KeyVersionRequest(name=name, version=version)
        return self._c.call(lambda: self._c.admin.EnableKeyVersion(req, timeout=self._c.timeout))

    def schedule_destruction(
        self, name: str, version: int, delay_seconds: float | None = None
    ) -> pb.Key:
        req = pb.ScheduleDestructionRequest(name=name, version=version)
        if delay_seconds is not None:
            req.delay.FromNanoseconds(int(delay_seconds * 1e9))
        return self._c.call(
            lambda: self._c.admin.ScheduleKeyVersionDestruction(req, timeout=self._c.timeout)
        )

    def cancel_destruction(self, name: str, version: int) -> pb.Key:
        req = pb.KeyVersionRequest(name=name, version=version)
        return self._c.call(
            lambda: self._c.admin.CancelKeyVersionDestruction(req, timeout=self._c.timeout)
        )

    def import_key(
        self, name: str, private_key_der: bytes, purpose: str = "sign", make_primary: bool = False
    ) -> pb.Key:
        req = pb.ImportKeyRequest(
            name=name,
            purpose=PURPOSES[purpose],
            private_key_der=private_key_der,
            make_primary=make_primary,
        )
        return self._c.call(lambda: self._c.admin.ImportKey(req, timeout=120))


def read_private_key_file(path: Path, passphrase_file: Path | None = None) -> bytes:
    """Reads a PEM or DER RSA private key (PKCS#1 or PKCS#8, encrypted or not) and returns it
    as unencrypted DER PKCS#8, for ImportKey. Asks for the passphrase of an encrypted key on a
    terminal, or reads it from ``passphrase_file``. Raises UsageError for anything else:
    unreadable, not a private key, not RSA, under 2048 bits, encrypted with no passphrase."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    passphrase: bytes | None = None
    if passphrase_file is not None:
        try:
            passphrase = passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as e:
            raise UsageError(f"cannot read {passphrase_file}: {e.strerror}") from None
    pem = b"-----BEGIN" in data
    encrypted = pem and (b"ENCRYPTED" in data)
    if encrypted and passphrase is None:
        if not sys.stdin.isatty():
            raise UsageError(
                f"{path} is encrypted; give --passphrase-file FILE (or run on a terminal to be "
                "asked)"
            )
        passphrase = getpass.getpass(f"passphrase for {path}: ").encode()
    load = serialization.load_pem_private_key if pem else serialization.load_der_private_key
    try:
        key = load(data, password=passphrase if encrypted else None)
    except TypeError:
        raise UsageError(
            f"{path} is encrypted; give --passphrase-file FILE (or run on a terminal)"
        ) from None
    except ValueError:
        raise UsageError(
            f"{path} is not a readable private key (PEM or DER, PKCS#1 or PKCS#8), or the "
            "passphrase is wrong"
        ) from None
    except Exception as e:  # cryptography raises its own types for unsupported formats
        raise UsageError(f"{path} cannot be read as a private key ({type(e).__name__})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UsageError(
            f"{path} holds a {type(key).__name__.lstrip('_')}; only RSA keys can be imported"
        )
    if key.key_size < 2048:
        raise UsageError(f"{path} is RSA-{key.key_size}; keys under 2048 bits are refused")
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
