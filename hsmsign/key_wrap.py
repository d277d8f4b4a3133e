"""Wrapping a private key for ImportKey, and what an importable key is (shared layer: no I/O).

The client wraps the way CKM_RSA_AES_KEY_WRAP (AWS KMS, Vault BYOK) does: an ephemeral AES-256
key wraps the DER PKCS#8 with AES key wrap with padding (RFC 5649, CKM_AES_KEY_WRAP_PAD), and
RSA-OAEP wraps the AES key to the daemon's import wrapping key. The daemon unwraps both inside
the token. The OAEP hash is the one the daemon advertises (SHA-256, or SHA-1 where the token
supports no other: SoftHSM2 2.6.1); the client follows it and never picks one itself.

The daemon also imports ``check_importable`` for the plaintext ceremony form.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from hsmsign import keyformats
from hsmsign.v1 import hsmsign_pb2 as pb

#: The only public exponent accepted for an imported key (every Capgo and OpenSSL key has it).
REQUIRED_PUBLIC_EXPONENT = 65537
#: DER of the AlgorithmIdentifier OID rsaEncryption (1.2.840.113549.1.1.1).
RSA_ENCRYPTION_OID_DER = bytes.fromhex("06092a864886f70d010101")
#: Bytes of the ephemeral AES key (AES-256).
AES_KEY_BYTES = 32

#: OAEP hash names for messages, and their cryptography hash classes.
OAEP_HASH_NAMES: dict[pb.OaepHash.ValueType, str] = {
    pb.OAEP_HASH_SHA1: "SHA-1",
    pb.OAEP_HASH_SHA256: "SHA-256",
}
_OAEP_HASHES: dict[pb.OaepHash.ValueType, type[hashes.HashAlgorithm]] = {
    pb.OAEP_HASH_SHA1: hashes.SHA1,
    pb.OAEP_HASH_SHA256: hashes.SHA256,
}


class UnsuitableKey(ValueError):
    """The key cannot be imported; the message says why in one line (no key material)."""


def _der_item(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER item at ``pos``."""
    if pos + 2 > len(data):
        raise UnsuitableKey("the private key is not DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise UnsuitableKey("the private key is not DER")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise UnsuitableKey("the private key is not DER")
    return tag, pos, pos + length


def pkcs8_algorithm_oid(der: bytes) -> bytes:
    """The DER-encoded OID (tag and length included) of a PKCS#8 PrivateKeyInfo's
    privateKeyAlgorithm. Raises UnsuitableKey when ``der`` is not a PrivateKeyInfo."""
    tag, start, _end = _der_item(der, 0)
    if tag != 0x30:
        raise UnsuitableKey("the private key is not a DER PKCS#8 PrivateKeyInfo")
    tag, _s, version_end = _der_item(der, start)  # version INTEGER
    if tag != 0x02:
        raise UnsuitableKey("the private key is not a DER PKCS#8 PrivateKeyInfo")
    tag, alg_start, _alg_end = _der_item(der, version_end)
    if tag != 0x30:
        raise UnsuitableKey("the private key is not a DER PKCS#8 PrivateKeyInfo")
    tag, _oid_start, oid_end = _der_item(der, alg_start)
    if tag != 0x06:
        raise UnsuitableKey("the private key is not a DER PKCS#8 PrivateKeyInfo")
    return der[alg_start:oid_end]


def check_public_key(pub: rsa.RSAPublicKey) -> None:
    """Raises UnsuitableKey unless the RSA key has e = 65537 and at least 2048 bits."""
    e = pub.public_numbers().e
    if e != REQUIRED_PUBLIC_EXPONENT:
        raise UnsuitableKey(
            f"the RSA key's public exponent is {e}; only {REQUIRED_PUBLIC_EXPONENT} is accepted"
        )
    if pub.key_size < 2048:
        raise UnsuitableKey(f"RSA-{pub.key_size} is too small to import; at least 2048 bits")


def check_importable(pkcs8_der: bytes) -> rsa.RSAPrivateKey:
    """Loads an unencrypted DER PKCS#8 private key and checks that it may be imported: the
    rsaEncryption OID (not RSA-PSS, not EC, ...), e = 65537, at least 2048 bits.

    Raises UnsuitableKey with a one-line message.
    """
    oid = pkcs8_algorithm_oid(pkcs8_der)
    if oid != RSA_ENCRYPTION_OID_DER:
        raise UnsuitableKey(
            "only rsaEncryption (1.2.840.113549.1.1.1) keys can be imported; this key's "
            f"algorithm OID is {_oid_text(oid)}"
        )
    try:
        key = serialization.load_der_private_key(pkcs8_der, password=None)
    except (ValueError, TypeError):
        raise UnsuitableKey("the private key is not an unencrypted DER PKCS#8 key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise UnsuitableKey(
            f"only RSA keys can be imported; this is a {type(key).__name__.lstrip('_')}"
        )
    check_public_key(key.public_key())
    return key


def _oid_text(oid_der: bytes) -> str:
    body = oid_der[2:]
    if not body:
        return "(empty)"
    parts = [body[0] // 40, body[0] % 40]
    value = 0
    for b in body[1:]:
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(value)
            value = 0
    return ".".join(str(p) for p in parts)


@dataclass(frozen=True)
class WrappingKey:
    """The daemon's import wrapping key as GetImportWrappingKey describes it."""

    public_key: rsa.RSAPublicKey
    fingerprint: str
    oaep_hash: pb.OaepHash.ValueType

    @classmethod
    def from_pb(cls, msg: pb.ImportWrappingKey) -> WrappingKey:
        """Raises UnsuitableKey when the answer is not a usable RSA key and OAEP hash, or
        its fingerprint does not match its key."""
        try:
            pub = serialization.load_der_public_key(msg.spki_der)
        except ValueError:
            raise UnsuitableKey("the import wrapping key is not a DER public key") from None
        if not isinstance(pub, rsa.RSAPublicKey) or pub.key_size < 2048:
            raise UnsuitableKey("the import wrapping key is not an RSA key of 2048 bits or more")
        if keyformats.fingerprint(pub) != msg.fingerprint:
            raise UnsuitableKey("the import wrapping key does not match its fingerprint")
        if msg.oaep_hash not in _OAEP_HASHES:
            raise UnsuitableKey(f"the daemon named an unknown OAEP hash ({msg.oaep_hash})")
        return cls(pub, msg.fingerprint, msg.oaep_hash)

    @property
    def oaep_hash_name(self) -> str:
        return OAEP_HASH_NAMES[self.oaep_hash]


def oaep_padding(oaep_hash: pb.OaepHash.ValueType) -> padding.OAEP:
    """RSA-OAEP with ``oaep_hash`` for both the digest and MGF1, and no label."""
    h = _OAEP_HASHES[oaep_hash]
    return padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None)


def wrap_pkcs8(pkcs8_der: bytes, public_key_der: bytes, to: WrappingKey) -> pb.WrappedPrivateKey:
    """Wraps ``pkcs8_der`` to ``to`` with a fresh AES-256 key; checks nothing about the key
    (``wrap_private_key`` does)."""
    aes_key = secrets.token_bytes(AES_KEY_BYTES)
    return pb.WrappedPrivateKey(
        wrapping_key_fingerprint=to.fingerprint,
        oaep_hash=to.oaep_hash,
        wrapped_aes_key=to.public_key.encrypt(aes_key, oaep_padding(to.oaep_hash)),
        wrapped_private_key=keywrap.aes_key_wrap_with_padding(aes_key, pkcs8_der),
        public_key_der=public_key_der,
    )


def wrap_private_key(pkcs8_der: bytes, to: WrappingKey) -> pb.WrappedPrivateKey:
    """The wrapped form of an importable key for ImportKey. Raises UnsuitableKey."""
    key = check_importable(pkcs8_der)
    return wrap_pkcs8(pkcs8_der, keyformats.spki_der(key.public_key()), to)
