"""One borrowed PKCS#11 session and what it does: sign, decrypt, unwrap, the implicit-rejection
HMAC, and the object management the key ring and key administration need.

Every mechanism comes from ``server.pkcs11.mechanisms`` and every template from
``server.pkcs11.templates``. PKCS#11 errors raised here reach ``Token.session``, which
classifies them (``server.pkcs11.errors``).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import Attribute, KeyType, ObjectClass

from server.errors import FailedPrecondition, KeyObjectGone, MechanismUnsupported
from server.pkcs11 import templates
from server.pkcs11.errors import (
    AMBIGUOUS_REJECTION,
    CIPHERTEXT_REJECTED,
    HANDLE_STALE,
    MECHANISM_REFUSED,
    UNWRAP_NOT_OFFERED,
    HalfWritten,
    Outcome,
    PKCS11Error,
    classify,
    outcome,
)
from server.pkcs11.keyimport import KeyImport
from server.pkcs11.mechanisms import (
    GENERIC_SECRET_KEY_GEN,
    RSA_PKCS,
    RSA_PKCS_KEY_PAIR_GEN,
    RSA_X_509,
    SHA256_HMAC,
    Mech,
)
from server.pkcs11.objects import KeyObjectInfo
from server.pkcs11.scan import describe_key, flag, rescan_if_changed
from server.pkcs11.templates import (
    IMPLICIT_REJECTION_LABEL,
)
from server.pkcs11.watchdog import CallWatchdog, token_call

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Only one thread of a process creates the implicit-rejection secret.
_IMPLICIT_REJECTION_LOCK = threading.Lock()


class Session(KeyImport):
    """One borrowed PKCS#11 session, with the private-key handles it has looked up."""

    def __init__(self, raw: Any, watchdog: CallWatchdog | None = None, epoch: int = 0) -> None:
        self.raw = raw
        #: The module initialisation it belongs to (``Token`` drops older ones).
        self.epoch = epoch
        self._keys: dict[bytes, Any] = {}
        #: Handle of the implicit-rejection secret, looked up once per session.
        self._implicit_rejection_key: Any = None
        self._watchdog = watchdog
        self._timing = False
        #: What the current borrower does with it (set by ``Token.session``, for log lines).
        self.purpose = "a token call"

    def timed(self, call: Callable[[], T], *, keygen: bool = False) -> T:
        """Runs ``call`` (one operation) under the process's token-call limit
        (``CallWatchdog.run``: raises CallOverdue when the limit passed)."""
        if self._watchdog is None or self._timing:  # nested: the outer operation is timed
            return call()
        self._timing = True
        try:
            return self._watchdog.run(self.purpose, call, keygen=keygen)
        finally:
            self._timing = False

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
        """Drops the cached handle of a key (its objects were destroyed)."""
        self._keys.pop(cka_id, None)

    def _with_key(self, cka_id: bytes, op: Callable[[Any], T]) -> T:
        """Runs op on the cached key handle; a stale handle is looked up again once.

        Raises KeyObjectGone when the private object is no longer in the token.
        """
        for attempt in (1, 2):
            key = self._private_key(cka_id)
            try:
                return op(key)
            except HANDLE_STALE:
                self.forget(cka_id)
                if attempt == 2:
                    raise KeyObjectGone(
                        "the key's private object is no longer in the token"
                    ) from None
            except AttributeError as e:
                # python-pkcs11 gives a handle methods by the capabilities the key had when
                # it was looked up: one found while disabled has no sign(); look it up again.
                if e.obj is not key:
                    raise
                self.forget(cka_id)
                if attempt == 2:
                    raise FailedPrecondition(
                        "the token refuses this key version: disabled (CKA_SIGN/CKA_DECRYPT off)"
                    ) from None
        raise AssertionError("unreachable")

    # -- signing ------------------------------------------------------------------------------

    @token_call()
    def sign(self, cka_id: bytes, mech: Mech, data: bytes) -> bytes:
        """C_Sign with an explicit mechanism over ``data`` (already a digest or encoded block)."""
        return self._with_key(
            cka_id,
            lambda k: bytes(k.sign(data, mechanism=mech.mechanism, mechanism_param=mech.param)),
        )

    @token_call()
    def sign_many(self, cka_id: bytes, mech: Mech, items: Sequence[bytes]) -> list[bytes]:
        """C_Sign of each item in order with one key lookup."""

        def run(k: Any) -> list[bytes]:
            return [
                bytes(k.sign(d, mechanism=mech.mechanism, mechanism_param=mech.param))
                for d in items
            ]

        return self._with_key(cka_id, run)

    # -- unwrap (server.ops.unwrap) -----------------------------------------------------------

    def _rsa_private_op(
        self, cka_id: bytes, mech: Mech, op: Callable[[Any], bytes]
    ) -> bytes | None:
        # v1.5 (implicit rejection): the work must not depend on the padding, so the check
        # runs for every ciphertext and decides a GeneralError without a second try.
        healthy = self._decrypts_known_answer(cka_id) if mech is RSA_PKCS else None
        try:
            return self._with_key(cka_id, op)
        except MECHANISM_REFUSED as e:
            raise MechanismUnsupported(
                f"the token does not support {mech.description} ({type(e).__name__})"
            ) from None
        except CIPHERTEXT_REJECTED:
            return None
        except AMBIGUOUS_REJECTION:
            if mech is RSA_X_509:
                raise  # raw RSA below the modulus has no padding to reject: a device fault
            if healthy is not None:
                if healthy:
                    return None
                raise
            return self._rejected_or_fault(cka_id, op)

    def _rejected_or_fault(self, cka_id: bytes, op: Callable[[Any], bytes]) -> bytes | None:
        """After CKR_GENERAL_ERROR, which SoftHSM2 answers for a bad padding and a failing
        device answers for anything: the operation once more (a transient fault gives the
        real answer now; a rejection repeats), then a known-answer decryption with the same
        key. If the token decrypts that correctly, it is healthy and the ciphertext was
        rejected (None); otherwise the GeneralError is re-raised as the device fault it is
        (docs/unwrap.md, "Token faults")."""
        try:
            return self._with_key(cka_id, op)
        except AMBIGUOUS_REJECTION:
            if self._decrypts_known_answer(cka_id):
                return None
            raise

    def _decrypts_known_answer(self, cka_id: bytes) -> bool:
        """Whether the token decrypts a fresh PKCS#1 v1.5 ciphertext of 16 random bytes right
        with this key (a request refusal shows the token answering: healthy too)."""
        key = self._private_key(cka_id)
        try:
            n = int.from_bytes(bytes(key[Attribute.MODULUS]), "big")
            e = int.from_bytes(bytes(key[Attribute.PUBLIC_EXPONENT]), "big")
            secret = os.urandom(16)
            probe = rsa.RSAPublicNumbers(e, n).public_key().encrypt(secret, padding.PKCS1v15())
            answer = bytes(key.decrypt(probe, mechanism=RSA_PKCS.mechanism))
        except PKCS11Error as exc:
            return outcome(exc) is Outcome.REQUEST
        return hmac.compare_digest(answer, secret)

    @token_call()
    def decrypt_or_none(self, cka_id: bytes, mech: Mech, data: bytes) -> bytes | None:
        """C_Decrypt; None when the token rejects the ciphertext (any reason, not told apart).

        Raises MechanismUnsupported naming ``mech`` when the token refuses the mechanism.
        """
        return self._rsa_private_op(
            cka_id,
            mech,
            lambda k: bytes(k.decrypt(data, mechanism=mech.mechanism, mechanism_param=mech.param)),
        )

    @token_call()
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
                    template=dict(templates.SESSION_SECRET_TEMPLATE),
                )
            except UNWRAP_NOT_OFFERED:
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
                        template=dict(templates.IMPLICIT_REJECTION_SECRET_TEMPLATE),
                    )
                    log.info("created the token's implicit-rejection secret")
                    key = self._find_implicit_rejection_key()
        self._implicit_rejection_key = key
        return key

    @token_call()
    def implicit_rejection_mac(self, data: bytes) -> bytes:
        """HMAC-SHA-256 of ``data`` under the token's implicit-rejection secret.

        The secret is a generic-secret token object (sensitive, never extractable, sign only),
        created on first need; it never leaves the token.
        """
        for attempt in (1, 2):
            key = self._implicit_rejection_secret()
            try:
                return bytes(key.sign(data, mechanism=SHA256_HMAC.mechanism))
            except HANDLE_STALE:
                self._implicit_rejection_key = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # -- object management (key ring, key administration) -----------------------------------

    @token_call()
    def find_key_objects(self, label_prefix: str) -> list[KeyObjectInfo]:
        """Every RSA private key whose label starts with ``label_prefix``, with its attributes."""

        def scan() -> list[KeyObjectInfo]:
            out = []
            for obj in self.raw.get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.RSA}
            ):
                label = obj[Attribute.LABEL] or ""
                if label.startswith(label_prefix):
                    info = describe_key(obj)
                    if info.modulus < 3 or info.public_exponent < 3:
                        raise HalfWritten  # another process is still creating it
                    out.append(info)
            return out

        return rescan_if_changed(scan)

    @token_call(keygen=True)
    def generate_rsa_keypair(
        self, bits: int, label: str, cka_id: bytes, *, sign: bool, decrypt: bool
    ) -> KeyObjectInfo:
        """Generates a key pair inside the token: sensitive, never extractable, one purpose.

        Raises the classified token error when the token refuses.
        """
        public_template = {
            **templates.rsa_public_key_template(label, cka_id, sign=sign, decrypt=decrypt),
            Attribute.MODULUS_BITS: bits,
            Attribute.PUBLIC_EXPONENT: b"\x01\x00\x01",
        }
        private_template = templates.rsa_private_key_template(
            label, cka_id, sign=sign, decrypt=decrypt
        )
        try:
            _pub, priv = self.raw.generate_keypair(
                KeyType.RSA,
                bits,
                store=True,
                mechanism=RSA_PKCS_KEY_PAIR_GEN.mechanism,
                public_template=public_template,
                private_template=private_template,
            )
        except PKCS11Error as e:
            raise classify(e, f"generating an RSA-{bits} key pair") from None
        return describe_key(priv)

    @token_call()
    def destroy_key_objects(self, cka_id: bytes) -> int:
        """Destroys the private and public objects with this CKA_ID; returns how many."""
        n = 0
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in list(self.raw.get_objects({Attribute.CLASS: cls, Attribute.ID: cka_id})):
                try:
                    obj.destroy()
                    n += 1
                except HANDLE_STALE:
                    pass  # another process destroyed it first: the outcome is the same
        self.forget(cka_id)
        return n

    @token_call()
    def set_key_usage(self, cka_id: bytes, *, signs: bool, usable: bool) -> int:
        """Allows or refuses the private key's one purpose in the token itself: CKA_SIGN for a
        signing key (``signs``), CKA_DECRYPT and CKA_UNWRAP for an unwrap key, set with
        C_SetAttributeValue. A disabled version is then refused by the token in every process
        at once (docs/adr/0007-keyring-state-concurrency.md). Returns how many private objects
        have the CKA_ID (0: the key is gone). Raises the classified token error when the token
        refuses the change (FailedPrecondition for a read-only attribute)."""
        attrs = (Attribute.SIGN,) if signs else (Attribute.DECRYPT, Attribute.UNWRAP)
        found = list(
            self.raw.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: cka_id})
        )
        for obj in found:
            for attr in attrs:
                if flag(obj, attr) != usable:
                    obj[attr] = usable
        return len(found)

    @token_call()
    def data_objects(self, application: str) -> list[tuple[Any, str, bytes]]:
        """CKO_DATA objects of an application: (object, label, value)."""

        def scan() -> list[tuple[Any, str, bytes]]:
            return [
                (obj, obj[Attribute.LABEL] or "", bytes(obj[Attribute.VALUE]))
                for obj in self.raw.get_objects(
                    {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: application}
                )
            ]

        return rescan_if_changed(scan)

    @token_call()
    def create_data_object(self, application: str, label: str, value: bytes) -> None:
        """Creates a CKO_DATA object on the token (``templates.data_object_template``)."""
        self.raw.create_object(templates.data_object_template(application, label, value))

    @token_call()
    def destroy_object(self, obj: Any) -> None:
        """Destroys an object returned by ``data_objects`` (state kept in data objects is
        replaced, never edited: docs/design-facts.md fact 7). One already destroyed by another
        process counts as destroyed."""
        with contextlib.suppress(*HANDLE_STALE):
            obj.destroy()

    @token_call()
    def random(self, n: int) -> bytes:
        """``n`` random bytes from the token's generator."""
        return bytes(self.raw.generate_random(n * 8))
