"""Key administration through hsmsignd's KeyAdmin service, and reading key files to import.

Used by ``hsmsign keys ...`` and by scripts. Every call raises
:class:`hsmsign.errors.RemoteError` with the daemon's status and one-line message.
"""

from __future__ import annotations

import base64
import getpass
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import key_wrap
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

    def import_wrapping_key(self) -> key_wrap.WrappingKey:
        """The daemon's import wrapping key and OAEP hash. Raises RemoteError, or UsageError
        when the daemon's answer is unusable."""
        req = pb.GetImportWrappingKeyRequest()
        r = self._c.call(lambda: self._c.admin.GetImportWrappingKey(req, timeout=120))
        try:
            return key_wrap.WrappingKey.from_pb(r)
        except key_wrap.UnsuitableKey as e:
            raise UsageError(str(e)) from None

    def import_key(
        self,
        name: str,
        private_key_der: bytes,
        purpose: str = "sign",
        make_primary: bool = False,
        to: key_wrap.WrappingKey | None = None,
    ) -> pb.Key:
        """Imports a DER PKCS#8 RSA key wrapped to the daemon's import wrapping key (``to``,
        fetched when not given), so that it is never in clear on the wire. Raises UsageError
        for a key that cannot be imported (not rsaEncryption, e != 65537, under 2048 bits),
        RemoteError from the daemon."""
        if to is None:
            to = self.import_wrapping_key()
        try:
            wrapped = key_wrap.wrap_private_key(private_key_der, to)
        except key_wrap.UnsuitableKey as e:
            raise UsageError(str(e)) from None
        req = pb.ImportKeyRequest(
            name=name, purpose=PURPOSES[purpose], wrapped=wrapped, make_primary=make_primary
        )
        return self._c.call(lambda: self._c.admin.ImportKey(req, timeout=120))

    def import_key_plaintext(
        self, name: str, private_key_der: bytes, purpose: str = "sign", make_primary: bool = False
    ) -> pb.Key:
        """Sends the key IN CLEAR: for a ceremony on a daemon that sets
        server.allow_plaintext_import (refused with FAILED_PRECONDITION otherwise)."""
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
    if not encrypted:
        _check_input_algorithm(path, data, pem)
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
    try:
        key_wrap.check_public_key(key.public_key())
    except key_wrap.UnsuitableKey as e:
        raise UsageError(f"{path}: {e}") from None
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
        raise UsageError(
            f"{path} is not an rsaEncryption key (RSA-PSS, or not RSA); only RSA keys "
            "with the rsaEncryption OID can be imported"
        )
