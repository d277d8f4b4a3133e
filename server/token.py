"""The PKCS#11 token: the only module that imports python-pkcs11.

One ``Token`` per process owns the loaded module, one logged-in session kept for the life
of the process (login is per application: docs/design-facts.md fact 2), and a bounded pool
of further sessions that calls borrow. Whether the pool's sessions run in parallel depends on
the module: python-pkcs11 calls ``C_Initialize(NULL)``, which tells a module that it will not
be called from several threads, and SoftHSM2 then disables its locking (fact 1). Through
p11-kit's proxy the real module is initialised with OS locking, so ``threading = "parallel"``;
any other module runs ``"serialized"`` (one lock around every call) unless the operator says
it is thread-safe.

Every PKCS#11 exception is classified here into the daemon's error types; nothing above this
module sees a python-pkcs11 type.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import MGF

from server.config import TokenConfig
from server.errors import (
    Busy,
    FailedPrecondition,
    InvalidArgument,
    KeyObjectGone,
    MechanismUnsupported,
    ServerError,
    StartupError,
    TokenNotFound,
    TokenUnavailable,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean the session (or the token behind it) is gone: the session is replaced.
_SESSION_LOST = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.UserNotLoggedIn,
)
# Errors that mean a cached object handle is stale (destroyed or re-created elsewhere).
_HANDLE_STALE = (p11e.KeyHandleInvalid, p11e.ObjectHandleInvalid)


def classify(exc: BaseException, what: str) -> ServerError:
    """Maps a python-pkcs11 exception to a daemon error with a clear message."""
    name = type(exc).__name__
    if isinstance(exc, p11e.MechanismInvalid | p11e.MechanismParamInvalid):
        return MechanismUnsupported(f"the token does not support {what} ({name})")
    if isinstance(exc, p11e.FunctionNotSupported):
        return MechanismUnsupported(f"the token does not implement {what} ({name})")
    if isinstance(exc, p11e.DataLenRange | p11e.DataInvalid):
        return InvalidArgument(f"the token refused the input for {what} ({name})")
    if isinstance(exc, p11e.KeyTypeInconsistent | p11e.KeyIndigestible | p11e.FunctionRejected):
        return FailedPrecondition(f"the key cannot be used for {what} ({name})")
    if isinstance(exc, p11e.AttributeReadOnly):
        return FailedPrecondition(f"the token does not allow changing this attribute ({what})")
    if isinstance(exc, p11e.DeviceMemory | p11e.HostMemory | p11e.SessionCount):
        return Busy(f"the token is out of resources during {what} ({name}); retry later")
    if isinstance(exc, p11e.PKCS11Error):
        return TokenUnavailable(f"token error during {what} ({name})")
    return TokenUnavailable(f"unexpected error during {what} ({name})")


@dataclass(frozen=True)
class Mech:
    """A PKCS#11 mechanism with its parameters, always explicit (never a library default)."""

    mechanism: Mechanism
    param: Any = None
    description: str = ""


#: The mechanisms hsmsign uses: one table (python-pkcs11's defaults are traps:
#: docs/design-facts.md fact 4).
RSA_PKCS = Mech(Mechanism.RSA_PKCS, None, "CKM_RSA_PKCS")
RSA_PSS_SHA256 = Mech(
    Mechanism.RSA_PKCS_PSS,
    (Mechanism.SHA256, MGF.SHA256, 32),
    "CKM_RSA_PKCS_PSS with SHA-256, MGF1-SHA-256, 32-byte salt",
)
RSA_PSS_SHA384 = Mech(
    Mechanism.RSA_PKCS_PSS,
    (Mechanism.SHA384, MGF.SHA384, 48),
    "CKM_RSA_PKCS_PSS with SHA-384, MGF1-SHA-384, 48-byte salt",
)
RSA_PSS_SHA512 = Mech(
    Mechanism.RSA_PKCS_PSS,
    (Mechanism.SHA512, MGF.SHA512, 64),
    "CKM_RSA_PKCS_PSS with SHA-512, MGF1-SHA-512, 64-byte salt",
)
RSA_OAEP_SHA1 = Mech(
    Mechanism.RSA_PKCS_OAEP,
    (Mechanism.SHA_1, MGF.SHA1, None),
    "CKM_RSA_PKCS_OAEP with SHA-1, MGF1-SHA-1, no label",
)
RSA_OAEP_SHA256 = Mech(
    Mechanism.RSA_PKCS_OAEP,
    (Mechanism.SHA256, MGF.SHA256, None),
    "CKM_RSA_PKCS_OAEP with SHA-256, MGF1-SHA-256, no label",
)

# Unwrap (server.unwrap): raw RSA lets PKCS#1 v1.5 padding be checked outside the token's
# error path (implicit rejection); the HMAC key derives the rejection value inside the token.
RSA_X_509 = Mech(Mechanism.RSA_X_509, None, "CKM_RSA_X_509 (raw RSA)")
SHA256_HMAC = Mech(Mechanism.SHA256_HMAC, None, "CKM_SHA256_HMAC")
GENERIC_SECRET_KEY_GEN = Mech(
    Mechanism.GENERIC_SECRET_KEY_GEN, None, "CKM_GENERIC_SECRET_KEY_GEN (256 bits)"
)

#: Label of the per-token secret that derives PKCS#1 v1.5 implicit-rejection keys.
IMPLICIT_REJECTION_LABEL = "hsmsign:implicit-rejection"

# C_UnwrapKey not offered for this mechanism/key/template: fall back to C_Decrypt.
_UNWRAP_NOT_OFFERED = (
    p11e.FunctionNotSupported,
    p11e.FunctionRejected,
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.ArgumentsBad,
    p11e.KeyTypeInconsistent,
    p11e.TemplateInconsistent,
    p11e.TemplateIncomplete,
    p11e.AttributeValueInvalid,
)
# The token refused the ciphertext itself (SoftHSM2 answers CKR_GENERAL_ERROR for every bad
# padding, OAEP or v1.5, and for an empty or oversized input).
_CIPHERTEXT_REJECTED = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.GeneralError,
)
# The mechanism or its parameters are refused. Our parameters come from the table above and
# are well formed, so CKR_ARGUMENTS_BAD means the token rejects them: SoftHSM2 2.6.1 answers
# it for OAEP with SHA-256 (docs/design-facts.md, fact 3).
_MECHANISM_REFUSED = (p11e.MechanismInvalid, p11e.MechanismParamInvalid, p11e.ArgumentsBad)

# A session-only, readable secret object: C_UnwrapKey's result is read once and destroyed.
_SESSION_SECRET_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: False,
    Attribute.EXTRACTABLE: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_IMPLICIT_REJECTION_LOCK = threading.Lock()

# Key import without plaintext (server.key_import): the token's import wrapping key is found
# by this label (outside the ring's "hsmsign:" prefix); RSA-3072, unwrap only.
IMPORT_WRAPPING_LABEL = "hsmsign-import-wrapping"
IMPORT_WRAPPING_BITS = 3072
AES_KEY_WRAP_PAD = Mech(Mechanism.AES_KEY_WRAP_PAD, None, "CKM_AES_KEY_WRAP_PAD (RFC 5649)")
# The ephemeral AES key: a session object, sensitive, that can only unwrap.
_IMPORT_AES_TEMPLATE: Mapping[Attribute, Any] = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: True,
    Attribute.DERIVE: False,
}


@dataclass(frozen=True)
class KeyObjectInfo:
    """What the token says about one private key object and its public half."""

    cka_id: bytes
    label: str
    modulus: int
    public_exponent: int
    can_sign: bool
    can_decrypt: bool
    can_unwrap: bool
    local: bool
    never_extractable: bool
    always_sensitive: bool
    extractable: bool
    sensitive: bool


class Session:
    """One borrowed PKCS#11 session, with the private-key handles it has looked up."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self._keys: dict[bytes, Any] = {}

    def _private_key(self, cka_id: bytes) -> Any:
        key = self._keys.get(cka_id)
        if key is None:
            objs = list(
                self.raw.get_objects(
                    {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id}
                )
            )
            if not objs:
                raise KeyObjectGone("the key's private object is no longer in the token")
            key = objs[0]
            self._keys[cka_id] = key
        return key

    def forget(self, cka_id: bytes) -> None:
        self._keys.pop(cka_id, None)

    def _with_key(self, cka_id: bytes, what: str, op: Callable[[Any], T]) -> T:
        """Runs op on the cached key handle; a stale handle is looked up again once."""
        for attempt in (1, 2):
            key = self._private_key(cka_id)
            try:
                return op(key)
            except _HANDLE_STALE:
                self.forget(cka_id)
                if attempt == 2:
                    raise KeyObjectGone(
                        "the key's private object is no longer in the token"
                    ) from None
        raise AssertionError("unreachable")

    def sign(self, cka_id: bytes, mech: Mech, data: bytes) -> bytes:
        """C_Sign with an explicit mechanism over ``data`` (already a digest or encoded block)."""
        return self._with_key(
            cka_id,
            mech.description,
            lambda k: bytes(k.sign(data, mechanism=mech.mechanism, mechanism_param=mech.param)),
        )

    def sign_many(self, cka_id: bytes, mech: Mech, items: Sequence[bytes]) -> list[bytes]:
        def run(k: Any) -> list[bytes]:
            return [
                bytes(k.sign(d, mechanism=mech.mechanism, mechanism_param=mech.param))
                for d in items
            ]

        return self._with_key(cka_id, mech.description, run)

    def decrypt(self, cka_id: bytes, mech: Mech, data: bytes) -> bytes:
        return self._with_key(
            cka_id,
            mech.description,
            lambda k: bytes(k.decrypt(data, mechanism=mech.mechanism, mechanism_param=mech.param)),
        )

    # -- unwrap (server.unwrap) ---------------------------------------------------------------

    #: Handle of the implicit-rejection secret, looked up once per session.
    _implicit_rejection_key: Any = None

    def _rsa_private_op(
        self, cka_id: bytes, mech: Mech, op: Callable[[Any], bytes]
    ) -> bytes | None:
        try:
            return self._with_key(cka_id, mech.description, op)
        except _MECHANISM_REFUSED as e:
            raise MechanismUnsupported(
                f"the token does not support {mech.description} ({type(e).__name__})"
            ) from None
        except _CIPHERTEXT_REJECTED:
            return None

    def decrypt_or_none(self, cka_id: bytes, mech: Mech, data: bytes) -> bytes | None:
        """C_Decrypt; None when the token rejects the ciphertext (any reason, not told apart).

        Raises MechanismUnsupported naming ``mech`` when the token refuses the mechanism.
        """
        return self._rsa_private_op(
            cka_id,
            mech,
            lambda k: bytes(k.decrypt(data, mechanism=mech.mechanism, mechanism_param=mech.param)),
        )

    def unwrap_secret(self, cka_id: bytes, mech: Mech, wrapped: bytes) -> bytes | None:
        """The secret an RSA ciphertext carries; None when the token rejects the ciphertext.

        C_UnwrapKey into a session-only (CKA_TOKEN=false) generic-secret object that is not
        sensitive, so its value can be read; the object is destroyed at once. Falls back to
        C_Decrypt where the token, the key or the template does not allow unwrap with ``mech``.
        Raises MechanismUnsupported naming ``mech`` when the token refuses the mechanism.
        """

        def op(k: Any) -> bytes:
            try:
                obj = k.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.GENERIC_SECRET,
                    wrapped,
                    mechanism=mech.mechanism,
                    mechanism_param=mech.param,
                    store=False,
                    template=dict(_SESSION_SECRET_TEMPLATE),
                )
            except _UNWRAP_NOT_OFFERED:
                return bytes(
                    k.decrypt(wrapped, mechanism=mech.mechanism, mechanism_param=mech.param)
                )
            try:
                return bytes(obj[Attribute.VALUE])
            finally:
                obj.destroy()

        return self._rsa_private_op(cka_id, mech, op)

    def _find_implicit_rejection_key(self) -> Any:
        objs = list(
            self.raw.get_objects(
                {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: IMPLICIT_REJECTION_LABEL}
            )
        )
        # Two daemons creating it at once leave two: every daemon picks the lowest CKA_ID.
        return min(objs, key=lambda o: bytes(o[Attribute.ID])) if objs else None

    def _implicit_rejection_secret(self) -> Any:
        key = self._implicit_rejection_key or self._find_implicit_rejection_key()
        if key is None:
            with _IMPLICIT_REJECTION_LOCK:
                key = self._find_implicit_rejection_key()
                if key is None:
                    self.raw.generate_key(
                        KeyType.GENERIC_SECRET,
                        256,
                        id=self.random(16),
                        label=IMPLICIT_REJECTION_LABEL,
                        store=True,
                        mechanism=GENERIC_SECRET_KEY_GEN.mechanism,
                        template={
                            Attribute.TOKEN: True,
                            Attribute.PRIVATE: True,
                            Attribute.SENSITIVE: True,
                            Attribute.EXTRACTABLE: False,
                            Attribute.MODIFIABLE: False,
                            Attribute.SIGN: True,
                            Attribute.VERIFY: False,
                            Attribute.ENCRYPT: False,
                            Attribute.DECRYPT: False,
                            Attribute.WRAP: False,
                            Attribute.UNWRAP: False,
                            Attribute.DERIVE: False,
                        },
                    )
                    log.info("created the token's implicit-rejection secret")
                    key = self._find_implicit_rejection_key()
        self._implicit_rejection_key = key
        return key

    def implicit_rejection_mac(self, data: bytes) -> bytes:
        """HMAC-SHA-256 of ``data`` under the token's implicit-rejection secret.

        The secret is a generic-secret token object (sensitive, never extractable, sign only),
        created on first need; it never leaves the token.
        """
        for attempt in (1, 2):
            key = self._implicit_rejection_secret()
            try:
                return bytes(key.sign(data, mechanism=SHA256_HMAC.mechanism))
            except _HANDLE_STALE:
                self._implicit_rejection_key = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- object management (key ring, admin) -----------------------------------------------

    def find_key_objects(self, label_prefix: str) -> list[KeyObjectInfo]:
        """Every RSA private key whose label starts with ``label_prefix``, with its attributes."""

        def scan() -> list[KeyObjectInfo]:
            out = []
            for obj in self.raw.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA}
            ):
                label = obj[Attribute.LABEL] or ""
                if label.startswith(label_prefix):
                    info = _describe(obj)
                    if info.modulus < 3 or info.public_exponent < 3:
                        raise _HalfWritten  # another process is still creating it
                    out.append(info)
            return out

        return _rescan_if_changed(scan)

    def generate_rsa_keypair(
        self, bits: int, label: str, cka_id: bytes, *, sign: bool, decrypt: bool
    ) -> KeyObjectInfo:
        """Generates a key pair inside the token: sensitive, never extractable, one purpose."""
        public_template = {
            **_public_key_template(label, cka_id, sign=sign, decrypt=decrypt),
            Attribute.MODULUS_BITS: bits,
            Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
        }
        private_template = _private_key_template(label, cka_id, sign=sign, decrypt=decrypt)
        try:
            _pub, priv = self.raw.generate_keypair(
                KeyType.RSA,
                bits,
                store=True,
                mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                public_template=public_template,
                private_template=private_template,
            )
        except p11e.PKCS11Error as e:
            raise classify(e, f"generating an RSA-{bits} key pair") from None
        return _describe(priv)

    def destroy_key_objects(self, cka_id: bytes) -> int:
        """Destroys the private and public objects with this CKA_ID; returns how many."""
        n = 0
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in list(self.raw.get_objects({Attribute.CLASS: cls, Attribute.ID: cka_id})):
                try:
                    obj.destroy()
                    n += 1
                except _HANDLE_STALE:
                    pass  # another process destroyed it first: the outcome is the same
        self.forget(cka_id)
        return n

    def data_objects(self, application: str) -> list[tuple[Any, str, bytes]]:
        """CKO_DATA objects of an application: (object, label, value)."""

        def scan() -> list[tuple[Any, str, bytes]]:
            return [
                (obj, obj[Attribute.LABEL] or "", bytes(obj[Attribute.VALUE]))
                for obj in self.raw.get_objects(
                    {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application}
                )
            ]

        return _rescan_if_changed(scan)

    def create_data_object(self, application: str, label: str, value: bytes) -> None:
        self.raw.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: True,
                Attribute.APPLICATION: application,
                Attribute.LABEL: label,
                Attribute.VALUE: value,
            }
        )

    def destroy_object(self, obj: Any) -> None:
        """Destroys an object returned by ``data_objects`` (state kept in data objects is
        replaced, never edited: docs/design-facts.md fact 7). One already destroyed by another
        process counts as destroyed."""
        with contextlib.suppress(*_HANDLE_STALE):
            obj.destroy()

    def import_rsa_private_key(
        self,
        label: str,
        cka_id: bytes,
        numbers: Mapping[str, int],
        *,
        sign: bool,
        decrypt: bool,
    ) -> KeyObjectInfo:
        """Writes an existing RSA key into the token as a private and a public object.

        ``numbers`` holds n, e, d, p, q, dmp1, dmq1, iqmp. The private object is sensitive and
        not extractable and has only its purpose's capabilities; the token reports it as not
        local (it was not generated there) and neither always sensitive nor never extractable.
        """

        def big(name: str) -> bytes:
            v = numbers[name]
            return v.to_bytes((v.bit_length() + 7) // 8 or 1, "big")

        private_template = {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            **_private_key_template(label, cka_id, sign=sign, decrypt=decrypt),
            Attribute.MODULUS: big("n"),
            Attribute.PUBLIC_EXPONENT: big("e"),
            Attribute.PRIVATE_EXPONENT: big("d"),
            Attribute.PRIME_1: big("p"),
            Attribute.PRIME_2: big("q"),
            Attribute.EXPONENT_1: big("dmp1"),
            Attribute.EXPONENT_2: big("dmq1"),
            Attribute.COEFFICIENT: big("iqmp"),
        }
        public_template = _rsa_public_object_template(
            label, cka_id, big("n"), big("e"), sign=sign, decrypt=decrypt
        )
        priv = None
        try:
            priv = self.raw.create_object(private_template)
            self.raw.create_object(public_template)
        except p11e.PKCS11Error as e:
            if priv is not None:  # no half-imported key left behind
                with contextlib.suppress(p11e.PKCS11Error):
                    priv.destroy()
            raise classify(e, "importing an RSA private key") from None
        return _describe(priv)

    def random(self, n: int) -> bytes:
        return bytes(self.raw.generate_random(n * 8))

    # -- key import without plaintext (server.key_import) -----------------------------------

    def import_wrapping_keys(self) -> list[KeyObjectInfo]:
        """The token's import wrapping keys (normally one; two when processes raced)."""

        def scan() -> list[KeyObjectInfo]:
            return [
                _describe(obj)
                for obj in self.raw.get_objects(
                    {
                        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                        Attribute.LABEL: IMPORT_WRAPPING_LABEL,
                    }
                )
            ]

        return _rescan_if_changed(scan)

    def generate_import_wrapping_key(self) -> KeyObjectInfo:
        """An RSA key pair whose private half can only unwrap (CKA_UNWRAP, nothing else)."""
        cka_id = self.random(16)
        common = {
            Attribute.TOKEN: True,
            Attribute.LABEL: IMPORT_WRAPPING_LABEL,
            Attribute.ID: cka_id,
        }
        try:
            _pub, priv = self.raw.generate_keypair(
                KeyType.RSA,
                IMPORT_WRAPPING_BITS,
                store=True,
                mechanism=Mechanism.RSA_PKCS_KEY_PAIR_GEN,
                public_template={
                    **common,
                    Attribute.PRIVATE: False,
                    Attribute.MODULUS_BITS: IMPORT_WRAPPING_BITS,
                    Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
                    Attribute.VERIFY: False,
                    Attribute.VERIFY_RECOVER: False,
                    Attribute.ENCRYPT: False,
                    Attribute.WRAP: False,
                    Attribute.DERIVE: False,
                },
                private_template={
                    **common,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: False,
                    Attribute.SIGN_RECOVER: False,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: True,
                    Attribute.DERIVE: False,
                },
            )
        except p11e.PKCS11Error as e:
            raise classify(e, "generating the import wrapping key") from None
        return _describe(priv)

    def _unwrap_aes_key(self, wrapping_cka_id: bytes, oaep: Mech, wrapped_aes_key: bytes) -> Any:
        """C_UnwrapKey of the ephemeral AES key into a session object that can only unwrap."""

        def op(k: Any) -> Any:
            return k.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                wrapped_aes_key,
                mechanism=oaep.mechanism,
                mechanism_param=oaep.param,
                store=False,
                template=dict(_IMPORT_AES_TEMPLATE),
            )

        try:
            return self._with_key(wrapping_cka_id, oaep.description, op)
        except _MECHANISM_REFUSED as e:
            raise MechanismUnsupported(
                f"the token does not support {oaep.description} ({type(e).__name__})"
            ) from None
        except (*_CIPHERTEXT_REJECTED, p11e.FunctionFailed, p11e.KeySizeRange):
            raise InvalidArgument(
                "the token could not unwrap wrapped_aes_key with the import wrapping key "
                f"({oaep.description})"
            ) from None

    def oaep_unwrap_works(self, wrapping_cka_id: bytes, oaep: Mech, wrapped_aes_key: bytes) -> bool:
        """Whether the token unwraps a (throwaway) AES key with ``oaep``; False when it
        refuses the mechanism or its parameters."""
        try:
            aes = self._unwrap_aes_key(wrapping_cka_id, oaep, wrapped_aes_key)
        except MechanismUnsupported:
            return False
        aes.destroy()
        return True

    def unwrap_rsa_private_key(
        self,
        wrapping_cka_id: bytes,
        oaep: Mech,
        wrapped_aes_key: bytes,
        wrapped_private_key: bytes,
        label: str,
        cka_id: bytes,
        *,
        sign: bool,
        decrypt: bool,
    ) -> KeyObjectInfo:
        """Unwraps an imported RSA key inside the token: the AES key with ``oaep`` under the
        import wrapping key (a session object, destroyed here), then the PKCS#8 with
        CKM_AES_KEY_WRAP_PAD into a token object with the import template (sensitive, not
        extractable, one purpose). The public object is made from the private one's modulus
        and exponent. Raises InvalidArgument when the token refuses a wrapped value,
        MechanismUnsupported when it refuses ``oaep``."""
        aes = self._unwrap_aes_key(wrapping_cka_id, oaep, wrapped_aes_key)
        try:
            template = {
                **_private_key_template(label, cka_id, sign=sign, decrypt=decrypt),
                # python-pkcs11 adds every capability; these are not private-key attributes.
                Attribute.ENCRYPT: pkcs11.DEFAULT,
                Attribute.VERIFY: pkcs11.DEFAULT,
                Attribute.WRAP: pkcs11.DEFAULT,
            }
            try:
                priv = aes.unwrap_key(
                    ObjectClass.PRIVATE_KEY,
                    KeyType.RSA,
                    wrapped_private_key,
                    mechanism=AES_KEY_WRAP_PAD.mechanism,
                    store=True,
                    template=template,
                )
            except (*_CIPHERTEXT_REJECTED, p11e.FunctionFailed, p11e.AttributeValueInvalid):
                raise InvalidArgument(
                    "the token refused wrapped_private_key: not an RSA PKCS#8 key wrapped "
                    "with this AES key (CKM_AES_KEY_WRAP_PAD)"
                ) from None
        finally:
            with contextlib.suppress(p11e.PKCS11Error):
                aes.destroy()
        try:
            info = _describe(priv)
            self.raw.create_object(
                _rsa_public_object_template(
                    label,
                    cka_id,
                    bytes(priv[Attribute.MODULUS]),
                    bytes(priv[Attribute.PUBLIC_EXPONENT]),
                    sign=sign,
                    decrypt=decrypt,
                )
            )
        except p11e.PKCS11Error as e:
            with contextlib.suppress(p11e.PKCS11Error):
                priv.destroy()  # no half-imported key left behind
            raise classify(e, "importing an RSA private key") from None
        return info


#: What a read-only scan of a SoftHSM2 file token raises while another process creates or
#: destroys objects in it: a vanished handle, or (measured: one process generating and
#: destroying key pairs, another scanning, 11 of 1,229 scans) CKR_FUNCTION_FAILED and
#: CKR_GENERAL_ERROR while an object file is half written or already unlinked, or a key
#: whose modulus reads as empty.
class _HalfWritten(Exception):
    """A key object whose public numbers read as empty: its file is still being written."""


_SCAN_COLLIDED = (*_HANDLE_STALE, p11e.FunctionFailed, p11e.GeneralError, _HalfWritten)
_SCAN_ATTEMPTS = 5


def _rescan_if_changed(scan: Callable[[], T]) -> T:
    """Runs an object scan again when another process changed the token's objects while it
    read them (docs/design-facts.md fact 7: such changes are visible at once). A scan only
    reads, so a retry is safe; the fifth collision in a row is reported."""
    for attempt in range(_SCAN_ATTEMPTS):
        try:
            return scan()
        except _SCAN_COLLIDED:
            if attempt == _SCAN_ATTEMPTS - 1:
                raise
            time.sleep(0.005 * (attempt + 1))
    raise AssertionError("unreachable")


def _public_key_template(label: str, cka_id: bytes, *, sign: bool, decrypt: bool) -> dict[Any, Any]:
    """A version's public key object: on the token, readable, only its purpose's uses."""
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.LABEL: label,
        Attribute.ID: cka_id,
        Attribute.VERIFY: sign,
        Attribute.ENCRYPT: decrypt,
        Attribute.WRAP: decrypt,
        Attribute.VERIFY_RECOVER: False,
        Attribute.DERIVE: False,
    }


def _rsa_public_object_template(
    label: str, cka_id: bytes, modulus: bytes, exponent: bytes, *, sign: bool, decrypt: bool
) -> dict[Any, Any]:
    """The public object of an imported version (generation makes its own)."""
    return {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: KeyType.RSA,
        **_public_key_template(label, cka_id, sign=sign, decrypt=decrypt),
        Attribute.MODULUS: modulus,
        Attribute.PUBLIC_EXPONENT: exponent,
    }


def _private_key_template(
    label: str, cka_id: bytes, *, sign: bool, decrypt: bool
) -> dict[Any, Any]:
    """A version's private key object: sensitive, never extractable, one purpose only."""
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.LABEL: label,
        Attribute.ID: cka_id,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: sign,
        Attribute.SIGN_RECOVER: False,
        Attribute.DECRYPT: decrypt,
        Attribute.UNWRAP: decrypt,
        Attribute.DERIVE: False,
    }


def _flag(obj: Any, attr: Attribute) -> bool:
    try:
        return bool(obj[attr])
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
        return False


def _describe(priv: Any) -> KeyObjectInfo:
    modulus = int.from_bytes(bytes(priv[Attribute.MODULUS]), "big")
    exponent = int.from_bytes(bytes(priv[Attribute.PUBLIC_EXPONENT]), "big")
    return KeyObjectInfo(
        cka_id=bytes(priv[Attribute.ID]),
        label=priv[Attribute.LABEL] or "",
        modulus=modulus,
        public_exponent=exponent,
        can_sign=_flag(priv, Attribute.SIGN),
        can_decrypt=_flag(priv, Attribute.DECRYPT),
        can_unwrap=_flag(priv, Attribute.UNWRAP),
        local=_flag(priv, Attribute.LOCAL),
        never_extractable=_flag(priv, Attribute.NEVER_EXTRACTABLE),
        always_sensitive=_flag(priv, Attribute.ALWAYS_SENSITIVE),
        extractable=_flag(priv, Attribute.EXTRACTABLE),
        sensitive=_flag(priv, Attribute.SENSITIVE),
    )


class _Waiter:
    __slots__ = ("gate", "session")

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.session: Session | None = None


class SessionPool:
    """Sessions lent in arrival order.

    A returned session goes straight to the longest-waiting caller, never to one that
    arrives later (a plain queue lets newcomers take it first, so under load a waiter could
    lose several times in a row: batch calls showed p99 at 3-6x their p50). Uncontended,
    lending and returning cost one lock each.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Session] = []
        self._waiters: collections.deque[_Waiter] = collections.deque()

    def put(self, s: Session) -> None:
        with self._lock:
            if self._waiters:
                w = self._waiters.popleft()
                w.session = s
                w.gate.release()
            else:
                self._free.append(s)

    def get(self, timeout: float) -> Session:
        """Raises queue.Empty when no session came within ``timeout`` seconds."""
        with self._lock:
            if self._free:
                return self._free.pop()
            w = _Waiter()
            self._waiters.append(w)
        if w.gate.acquire(timeout=timeout) and w.session is not None:
            return w.session
        with self._lock:
            if w.session is not None:  # handed over just as the wait timed out
                return w.session
            self._waiters.remove(w)
        raise queue.Empty

    def get_nowait(self) -> Session:
        with self._lock:
            if self._free:
                return self._free.pop()
        raise queue.Empty


class Token:
    """The loaded module, the login session and the session pool. Thread-safe."""

    def __init__(self, config: TokenConfig) -> None:
        self.config = config
        self._serial_lock: threading.Lock | None = (
            threading.Lock() if config.threading == "serialized" else None
        )
        self._pool = SessionPool()
        self._closed = False
        for k, v in config.environment.items():
            os.environ[k] = v
        if not config.module.exists():
            raise StartupError(f"PKCS#11 module not found: {config.module} (token.module)")
        try:
            self._lib = pkcs11.lib(str(config.module))
        except p11e.PKCS11Error as e:
            raise StartupError(f"cannot load PKCS#11 module {config.module}: {e}") from None
        try:
            self._token = self._lib.get_token(token_label=config.label, token_serial=config.serial)
        except p11e.NoSuchToken:
            raise TokenNotFound(
                f"no token with {config.describe_token()} in module {config.module}"
            ) from None
        except p11e.MultipleTokensReturned:
            raise StartupError(
                f"several tokens have {config.describe_token()}; select by serial instead"
            ) from None
        pin = config.pin.read()
        try:
            # Kept open for the life of the process: closing it would log every session out.
            self._login = self._token.open(user_pin=pin, rw=True)
        except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange):
            raise StartupError(
                f"the token refused the PIN from {config.pin.describe()} (not retried, "
                "to avoid locking the token)"
            ) from None
        except p11e.PinLocked:
            raise StartupError(
                "the token's user PIN is locked; unlock it with the SO PIN"
            ) from None
        except p11e.PKCS11Error as e:
            raise StartupError(f"cannot log in to the token: {type(e).__name__}") from None
        finally:
            del pin
        for _ in range(config.sessions):
            self._pool.put(Session(self._open_session()))
        log.info(
            "token %s: %d sessions, threading=%s, module %s",
            config.describe_token(),
            config.sessions,
            config.threading,
            config.module,
        )

    @property
    def label(self) -> str:
        return str(self._token.label)

    def _open_session(self) -> Any:
        try:
            return self._token.open(rw=True)
        except p11e.PKCS11Error as e:
            raise TokenUnavailable(f"cannot open a token session ({type(e).__name__})") from None

    @contextlib.contextmanager
    def session(self, what: str) -> Iterator[Session]:
        """Borrows a session for one operation; classifies PKCS#11 errors raised inside.

        Raises Busy when no session frees up in time, TokenUnavailable when the token fails.
        """
        if self._closed:
            raise TokenUnavailable("the daemon is shutting down")
        try:
            s = self._pool.get(timeout=self.config.session_wait_seconds)
        except queue.Empty:
            raise Busy(
                f"all {self.config.sessions} token sessions stayed busy for "
                f"{self.config.session_wait_seconds:g}s; retry later"
            ) from None
        lock = self._serial_lock or contextlib.nullcontext()
        try:
            with lock:
                yield s
        except ServerError:
            raise
        except _SESSION_LOST as e:
            log.warning("token session lost during %s (%s); replacing it", what, type(e).__name__)
            s = self._replace(s)
            raise TokenUnavailable(f"the token session was lost during {what}; retry") from None
        except p11e.PKCS11Error as e:
            raise classify(e, what) from None
        finally:
            self._pool.put(s)

    def _replace(self, s: Session) -> Session:
        with contextlib.suppress(Exception):
            s.raw.close()
        try:
            return Session(self._open_session())
        except TokenUnavailable:
            return s

    def close(self) -> None:
        """Closes the pool's sessions, then the login session, then finalises the module."""
        self._closed = True
        while True:
            try:
                s = self._pool.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(Exception):
                s.raw.close()
        with contextlib.suppress(Exception):
            self._login.close()
