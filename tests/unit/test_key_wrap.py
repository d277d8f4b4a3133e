"""hsmsign.key_wrap: what an importable key is, and that the wrapped form unwraps (with the
same algorithms the token uses: RSA-OAEP, then RFC 5649) to exactly the PKCS#8."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from hsmsign import key_wrap, keyformats
from hsmsign.v1 import hsmsign_pb2 as pb


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pss_oid(der: bytes) -> bytes:
    old = bytes.fromhex("300d06092a864886f70d0101010500")
    new = der.replace(old, bytes.fromhex("300b06092a864886f70d01010a"))
    length = int.from_bytes(new[2:4], "big") - 2
    return new[:2] + length.to_bytes(2, "big") + new[4:]


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.mark.parametrize("oaep_hash", [pb.OAEP_HASH_SHA1, pb.OAEP_HASH_SHA256])
def test_wrapped_form_unwraps_to_the_pkcs8(
    rsa_key: rsa.RSAPrivateKey, oaep_hash: pb.OaepHash.ValueType
) -> None:
    importer = rsa.generate_private_key(65537, 3072)
    pub = importer.public_key()
    to = key_wrap.WrappingKey.from_pb(
        pb.ImportWrappingKey(
            spki_der=keyformats.spki_der(pub),
            fingerprint=keyformats.fingerprint(pub),
            oaep_hash=oaep_hash,
        )
    )
    der = _pkcs8(rsa_key)
    w = key_wrap.wrap_private_key(der, to)
    assert w.wrapping_key_fingerprint == to.fingerprint and w.oaep_hash == oaep_hash
    assert w.public_key_der == keyformats.spki_der(rsa_key.public_key())
    aes = importer.decrypt(w.wrapped_aes_key, key_wrap.oaep_padding(oaep_hash))
    assert len(aes) == 32
    assert keywrap.aes_key_unwrap_with_padding(aes, w.wrapped_private_key) == der
    assert der not in w.SerializeToString()


def test_wrapping_key_must_match_its_fingerprint() -> None:
    pub = rsa.generate_private_key(65537, 2048).public_key()
    msg = pb.ImportWrappingKey(
        spki_der=keyformats.spki_der(pub), fingerprint="0" * 64, oaep_hash=pb.OAEP_HASH_SHA256
    )
    with pytest.raises(key_wrap.UnsuitableKey, match="fingerprint"):
        key_wrap.WrappingKey.from_pb(msg)
    msg.fingerprint = keyformats.fingerprint(pub)
    msg.oaep_hash = pb.OAEP_HASH_UNSPECIFIED
    with pytest.raises(key_wrap.UnsuitableKey, match="OAEP"):
        key_wrap.WrappingKey.from_pb(msg)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _pss_oid(_pkcs8(rsa.generate_private_key(65537, 2048))), "1.2.840.113549.1.1.10"),
        (lambda: _pkcs8(ec.generate_private_key(ec.SECP256R1())), "1.2.840.10045.2.1"),
        (lambda: _pkcs8(rsa.generate_private_key(3, 2048)), "public exponent is 3"),
        (lambda: _pkcs8(rsa.generate_private_key(65537, 1024)), "too small"),  # noqa: S505
        (lambda: b"\x30\x03\x02\x01", "not DER"),
        (lambda: b"\x04\x02ab", "PKCS#8"),
    ],
    ids=["rsa-pss-oid", "ec", "e3", "rsa-1024", "truncated", "garbage"],
)
def test_unsuitable_keys_are_refused(make: object, message: str) -> None:
    with pytest.raises(key_wrap.UnsuitableKey, match=message.replace(".", r"\.")):
        key_wrap.check_importable(make())  # type: ignore[operator]


def test_rsa_encryption_key_is_importable(rsa_key: rsa.RSAPrivateKey) -> None:
    der = _pkcs8(rsa_key)
    assert key_wrap.pkcs8_algorithm_oid(der) == key_wrap.RSA_ENCRYPTION_OID_DER
    loaded = key_wrap.check_importable(der)
    assert loaded.public_key().public_numbers() == rsa_key.public_key().public_numbers()
