"""Key import without plaintext on the wire: the import wrapping key and the wrapped ImportKey.

The token holds one import wrapping key (RSA-3072, label ``hsmsign-import-wrapping``, its
private half can only unwrap), created on the first GetImportWrappingKey. The client wraps an
ephemeral AES-256 key to it with RSA-OAEP and the PKCS#8 with that AES key (RFC 5649); the
token unwraps both (C_UnwrapKey), so the private key is never in clear in this process's own
memory nor on the wire (with SoftHSM2 the token library runs inside the daemon process; with a
real HSM it never leaves the HSM).

The OAEP hash is SHA-256 where the token accepts it. SoftHSM2 2.6.1 unwraps with OAEP-SHA-1
only (docs/design-facts.md fact 3): the daemon finds that out by a trial unwrap of a throwaway
AES key, logs a warning, and advertises SHA-1 in GetImportWrappingKey; the client uses what is
advertised and says so, and the daemon accepts only the hash it advertised.
"""

from __future__ import annotations

import logging
import os
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import key_wrap, keyformats
from hsmsign.v1 import hsmsign_pb2 as pb
from server.config import ServerConfig
from server.errors import FailedPrecondition, InvalidArgument
from server.keyring.model import KeyVersion, Purpose, spki_b64
from server.keyring.ring import KeyRing
from server.ops import keyadmin
from server.pkcs11.mechanisms import RSA_OAEP_SHA1, RSA_OAEP_SHA256, Mech
from server.pkcs11.objects import KeyObjectInfo
from server.pkcs11.session import Session

log = logging.getLogger(__name__)

_OAEP_MECHS: dict[pb.OaepHash.ValueType, Mech] = {
    pb.OAEP_HASH_SHA256: RSA_OAEP_SHA256,
    pb.OAEP_HASH_SHA1: RSA_OAEP_SHA1,
}
# Creation is serialised within a process; two processes racing leave two keys, and each is
# found by its fingerprint (GetImportWrappingKey hands out the lowest CKA_ID).
_CREATE_LOCK = threading.Lock()
# OAEP hash per import wrapping key fingerprint, found once per process.
_OAEP_CHOSEN: dict[str, pb.OaepHash.ValueType] = {}


def _public_key(info: KeyObjectInfo) -> rsa.RSAPublicKey:
    return keyformats.public_key_from_numbers(info.modulus, info.public_exponent)


def _current(s: Session) -> KeyObjectInfo | None:
    keys = s.import_wrapping_keys()
    return min(keys, key=lambda k: k.cka_id) if keys else None


def _choose_oaep(s: Session, info: KeyObjectInfo) -> pb.OaepHash.ValueType:
    fp = keyformats.fingerprint(_public_key(info))
    chosen = _OAEP_CHOSEN.get(fp)
    if chosen is not None:
        return chosen
    pub = _public_key(info)
    for oaep_hash in (pb.OAEP_HASH_SHA256, pb.OAEP_HASH_SHA1):
        trial = pub.encrypt(os.urandom(key_wrap.AES_KEY_BYTES), key_wrap.oaep_padding(oaep_hash))
        if s.oaep_unwrap_works(info.cka_id, _OAEP_MECHS[oaep_hash], trial):
            if oaep_hash != pb.OAEP_HASH_SHA256:
                log.warning(
                    "the token refuses %s for unwrap; the import wrapping key is advertised "
                    "with %s (GetImportWrappingKey tells clients)",
                    RSA_OAEP_SHA256.description,
                    _OAEP_MECHS[oaep_hash].description,
                )
            _OAEP_CHOSEN[fp] = oaep_hash
            return oaep_hash
    raise FailedPrecondition(
        "the token unwraps with neither CKM_RSA_PKCS_OAEP SHA-256 nor SHA-1; wrapped import "
        "is not possible (import offline with 'hsmsignd keys import' on the host)"
    )


def get_import_wrapping_key(ring: KeyRing) -> pb.ImportWrappingKey:
    """The import wrapping key's public half and the OAEP hash to use; creates the key in the
    token on first need. Raises token errors as classified by ``server.pkcs11.errors``."""
    # Held like every other object change: the daemon's other processes do not scan meanwhile.
    with ring.objects_exclusive(), ring.token.session("reading the import wrapping key") as s:
        info = _current(s)
        if info is None:
            with _CREATE_LOCK:
                info = _current(s)
                if info is None:
                    info = s.generate_import_wrapping_key()
                    log.info(
                        "created the token's import wrapping key sha256:%s",
                        keyformats.fingerprint(_public_key(info)),
                    )
        oaep_hash = _choose_oaep(s, info)
    pub = _public_key(info)
    return pb.ImportWrappingKey(
        spki_der=keyformats.spki_der(pub),
        fingerprint=keyformats.fingerprint(pub),
        oaep_hash=oaep_hash,
    )


def _wrapping_key(s: Session, fingerprint: str) -> KeyObjectInfo:
    for info in s.import_wrapping_keys():
        if keyformats.fingerprint(_public_key(info)) == fingerprint:
            return info
    raise FailedPrecondition(
        f"wrapping_key_fingerprint {fingerprint[:16]!r}... is not this token's import wrapping "
        "key; call GetImportWrappingKey and wrap again"
    )


def _claimed_public_key(wrapped: pb.WrappedPrivateKey) -> rsa.RSAPublicKey:
    try:
        pub = serialization.load_der_public_key(wrapped.public_key_der)
    except ValueError:
        raise InvalidArgument("wrapped.public_key_der is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(pub, rsa.RSAPublicKey):
        raise InvalidArgument("only RSA keys can be imported; wrapped.public_key_der is not RSA")
    try:
        key_wrap.check_public_key(pub)
    except key_wrap.UnsuitableKey as e:
        raise InvalidArgument(str(e)) from None
    return pub


def import_wrapped_key(
    ring: KeyRing,
    name: str,
    purpose: Purpose,
    wrapped: pb.WrappedPrivateKey,
    make_primary: bool,
) -> KeyVersion:
    """Unwraps a wrapped RSA private key inside the token as a new version of ``name`` (as
    ``server.ops.keyadmin.import_key`` does with a plaintext one). The public key the request claims
    is checked (RSA, e = 65537, size) before, and against the unwrapped object after.

    Raises InvalidArgument (bad or mismatching key material), FailedPrecondition (another
    wrapping key or OAEP hash; the key already in the ring), and token errors.
    """
    for field in ("wrapping_key_fingerprint", "wrapped_aes_key", "wrapped_private_key"):
        if not getattr(wrapped, field):
            raise InvalidArgument(f"wrapped.{field} is empty")
    claimed = _claimed_public_key(wrapped)
    bits = claimed.key_size
    claimed_numbers = claimed.public_numbers()

    def make(s: Session, label: str, cka_id: bytes) -> KeyObjectInfo:
        wrapping = _wrapping_key(s, wrapped.wrapping_key_fingerprint)
        advertised = _choose_oaep(s, wrapping)
        if wrapped.oaep_hash != advertised:
            raise FailedPrecondition(
                f"wrapped.oaep_hash must be {key_wrap.OAEP_HASH_NAMES[advertised]}, the hash "
                "GetImportWrappingKey names for this token"
            )
        info = s.unwrap_rsa_private_key(
            wrapping.cka_id,
            _OAEP_MECHS[advertised],
            wrapped.wrapped_aes_key,
            wrapped.wrapped_private_key,
            label,
            cka_id,
            sign=purpose is Purpose.SIGN,
            decrypt=purpose is Purpose.UNWRAP,
        )
        if info.modulus != claimed_numbers.n or info.public_exponent != claimed_numbers.e:
            s.destroy_key_objects(cka_id)
            raise InvalidArgument(
                "the unwrapped private key does not match wrapped.public_key_der"
                + (
                    f" (its public exponent is {info.public_exponent})"
                    if info.public_exponent != key_wrap.REQUIRED_PUBLIC_EXPONENT
                    else ""
                )
            )
        return info

    return keyadmin.new_imported_version(
        ring, name, purpose, bits, make_primary, make, spki_b64(claimed)
    )


def check_plaintext_import_allowed(server: ServerConfig, peer: str) -> None:
    """Raises FailedPrecondition unless ``server.allow_plaintext_import`` is set and the caller
    is on the admin socket (``server.admin_listen``: a unix socket, whose owner, group and
    mode decide who may connect; loopback TCP is open to every user of the host); logs a
    warning for every plaintext import it lets in."""
    if not server.allow_plaintext_import:
        raise FailedPrecondition(
            "ImportKey with the private key in clear (private_key_der) is refused by this "
            "daemon: send it wrapped ('hsmsign keys import' wraps by default, to the key from "
            "GetImportWrappingKey), or import offline on the host with 'hsmsignd keys import'"
        )
    if not peer.startswith("unix:"):
        raise FailedPrecondition(
            "ImportKey with the private key in clear is accepted on the admin socket only "
            "(server.admin_listen, with server.allow_plaintext_import); send it wrapped "
            "('hsmsign keys import' wraps by default)"
        )
    log.warning("plaintext ImportKey accepted from %s (server.allow_plaintext_import)", peer)
