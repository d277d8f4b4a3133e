"""Writing keys into the token: an RSA private key given as its numbers (the offline
ceremony, ``hsmsignd keys import``), and key import without plaintext on the wire
(``server.ops.key_import``): the import wrapping key, and unwrapping an AES-wrapped PKCS#8
inside the token. Methods of ``server.pkcs11.session.Session`` (this class is one of its
bases), kept apart so that neither module grows past the size limit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass

from server.errors import InvalidArgument, MechanismUnsupported
from server.pkcs11 import templates
from server.pkcs11.errors import (
    MECHANISM_REFUSED,
    WRAPPED_KEY_REFUSED,
    PKCS11Error,
    classify,
)
from server.pkcs11.mechanisms import (
    AES_KEY_WRAP_PAD,
    RSA_PKCS_KEY_PAIR_GEN,
    Mech,
)
from server.pkcs11.objects import KeyObjectInfo
from server.pkcs11.scan import describe_key, rescan_if_changed
from server.pkcs11.templates import (
    IMPORT_WRAPPING_BITS,
    IMPORT_WRAPPING_LABEL,
)
from server.pkcs11.watchdog import token_call

log = logging.getLogger(__name__)

T = TypeVar("T")


class KeyImport:
    """The key-writing methods of ``Session``; it provides ``raw``, ``timed``, ``random``
    and ``_with_key``."""

    raw: Any

    if TYPE_CHECKING:

        def timed(self, call: Callable[[], T], *, keygen: bool = False) -> T: ...

        def random(self, n: int) -> bytes: ...

        def _with_key(self, cka_id: bytes, op: Callable[[Any], T]) -> T: ...

    @token_call()
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
        Raises the classified token error when the token refuses; leaves no half-imported key.
        """

        def big(name: str) -> bytes:
            v = numbers[name]
            return v.to_bytes((v.bit_length() + 7) // 8 or 1, "big")

        private_template = {
            **templates.rsa_private_key_template(label, cka_id, sign=sign, decrypt=decrypt),
            Attribute.MODULUS: big("n"),
            Attribute.PUBLIC_EXPONENT: big("e"),
            Attribute.PRIVATE_EXPONENT: big("d"),
            Attribute.PRIME_1: big("p"),
            Attribute.PRIME_2: big("q"),
            Attribute.EXPONENT_1: big("dmp1"),
            Attribute.EXPONENT_2: big("dmq1"),
            Attribute.COEFFICIENT: big("iqmp"),
        }
        public_template = _imported_public_template(
            label, cka_id, big("n"), big("e"), sign=sign, decrypt=decrypt
        )
        priv = None
        try:
            priv = self.raw.create_object(private_template)
            self.raw.create_object(public_template)
        except PKCS11Error as e:
            if priv is not None:  # no half-imported key left behind
                with contextlib.suppress(PKCS11Error):
                    priv.destroy()
            raise classify(e, "importing an RSA private key") from None
        return describe_key(priv)

    # -- key import without plaintext (server.ops.key_import) ---------------------------------

    @token_call()
    def import_wrapping_keys(self) -> list[KeyObjectInfo]:
        """The token's import wrapping keys (normally one; two when processes raced)."""

        def scan() -> list[KeyObjectInfo]:
            return [
                describe_key(obj)
                for obj in self.raw.get_objects(
                    {
                        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                        Attribute.LABEL: IMPORT_WRAPPING_LABEL,
                    }
                )
            ]

        return rescan_if_changed(scan)

    @token_call(keygen=True)
    def generate_import_wrapping_key(self) -> KeyObjectInfo:
        """An RSA key pair whose private half can only unwrap (CKA_UNWRAP, nothing else).

        Raises the classified token error when the token refuses.
        """
        cka_id = self.random(16)
        try:
            _pub, priv = self.raw.generate_keypair(
                KeyType.RSA,
                IMPORT_WRAPPING_BITS,
                store=True,
                mechanism=RSA_PKCS_KEY_PAIR_GEN.mechanism,
                public_template=templates.import_wrapping_public_template(cka_id),
                private_template=templates.import_wrapping_private_template(cka_id),
            )
        except PKCS11Error as e:
            raise classify(e, "generating the import wrapping key") from None
        return describe_key(priv)

    def _unwrap_aes_key(self, wrapping_cka_id: bytes, oaep: Mech, wrapped_aes_key: bytes) -> Any:
        """C_UnwrapKey of the ephemeral AES key into a session object that can only unwrap.

        Raises MechanismUnsupported when the token refuses ``oaep``, InvalidArgument when it
        refuses the wrapped AES key.
        """

        def op(k: Any) -> Any:
            return k.unwrap_key(
                ObjectClass.SECRET_KEY,
                KeyType.AES,
                wrapped_aes_key,
                mechanism=oaep.mechanism,
                mechanism_param=oaep.param,
                store=False,
                template=dict(templates.IMPORT_AES_TEMPLATE),
            )

        try:
            return self._with_key(wrapping_cka_id, op)
        except MECHANISM_REFUSED as e:
            raise MechanismUnsupported(
                f"the token does not support {oaep.description} ({type(e).__name__})"
            ) from None
        except WRAPPED_KEY_REFUSED:
            raise InvalidArgument(
                "the token could not unwrap wrapped_aes_key with the import wrapping key "
                f"({oaep.description})"
            ) from None

    @token_call()
    def oaep_unwrap_works(self, wrapping_cka_id: bytes, oaep: Mech, wrapped_aes_key: bytes) -> bool:
        """Whether the token unwraps a (throwaway) AES key with ``oaep``; False when it
        refuses the mechanism or its parameters. Raises InvalidArgument when it refuses the
        wrapped key itself."""
        try:
            aes = self._unwrap_aes_key(wrapping_cka_id, oaep, wrapped_aes_key)
        except MechanismUnsupported:
            return False
        aes.destroy()
        return True

    @token_call()
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
        CKM_AES_KEY_WRAP_PAD into a token object with the key-version template (sensitive, not
        extractable, one purpose). The public object is made from the private one's modulus
        and exponent. Raises InvalidArgument when the token refuses a wrapped value,
        MechanismUnsupported when it refuses ``oaep``, the classified token error otherwise;
        leaves no half-imported key."""
        aes = self._unwrap_aes_key(wrapping_cka_id, oaep, wrapped_aes_key)
        try:
            template = {
                **templates.rsa_private_key_template(label, cka_id, sign=sign, decrypt=decrypt),
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
                    mechanism_param=AES_KEY_WRAP_PAD.param,
                    store=True,
                    template=template,
                )
            except WRAPPED_KEY_REFUSED:
                raise InvalidArgument(
                    "the token refused wrapped_private_key: not an RSA PKCS#8 key wrapped "
                    f"with this AES key ({AES_KEY_WRAP_PAD.description})"
                ) from None
        finally:
            with contextlib.suppress(PKCS11Error):
                aes.destroy()
        try:
            info = describe_key(priv)
            self.raw.create_object(
                _imported_public_template(
                    label,
                    cka_id,
                    bytes(priv[Attribute.MODULUS]),
                    bytes(priv[Attribute.PUBLIC_EXPONENT]),
                    sign=sign,
                    decrypt=decrypt,
                )
            )
        except PKCS11Error as e:
            with contextlib.suppress(PKCS11Error):
                priv.destroy()  # no half-imported key left behind
            raise classify(e, "importing an RSA private key") from None
        return info


def _imported_public_template(
    label: str, cka_id: bytes, modulus: bytes, exponent: bytes, *, sign: bool, decrypt: bool
) -> templates.Template:
    """The public object of an imported version (generation makes its own)."""
    return {
        **templates.rsa_public_key_template(label, cka_id, sign=sign, decrypt=decrypt),
        Attribute.MODULUS: modulus,
        Attribute.PUBLIC_EXPONENT: exponent,
    }
