"""The PKCS#11 tables: one mechanism table with explicit parameters, templates written out in
full (sensitive, never extractable, one purpose)."""

from __future__ import annotations

import pytest
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11.mechanisms import MGF

from server.pkcs11 import mechanisms, templates
from server.pkcs11.mechanisms import MECHANISMS


def test_every_mechanism_is_in_the_table_once_by_its_name() -> None:
    assert all(name == m.name for name, m in MECHANISMS.items())
    named = [v for v in vars(mechanisms).values() if isinstance(v, mechanisms.Mech)]
    assert {m.name for m in named} == set(MECHANISMS)


@pytest.mark.parametrize(
    ("name", "hash_", "mgf", "salt"),
    [
        ("rsa-pss-sha256", Mechanism.SHA256, MGF.SHA256, 32),
        ("rsa-pss-sha384", Mechanism.SHA384, MGF.SHA384, 48),
        ("rsa-pss-sha512", Mechanism.SHA512, MGF.SHA512, 64),
    ],
)
def test_pss_parameters_are_explicit(name: str, hash_: Mechanism, mgf: MGF, salt: int) -> None:
    # python-pkcs11 would default every PSS variant to SHA-1 parameters.
    m = MECHANISMS[name]
    assert m.mechanism is Mechanism.RSA_PKCS_PSS and m.param == (hash_, mgf, salt)


@pytest.mark.parametrize(
    ("name", "hash_", "mgf"),
    [
        ("rsa-oaep-sha1", Mechanism.SHA_1, MGF.SHA1),
        ("rsa-oaep-sha256", Mechanism.SHA256, MGF.SHA256),
    ],
)
def test_oaep_parameters_are_explicit(name: str, hash_: Mechanism, mgf: MGF) -> None:
    m = MECHANISMS[name]
    assert m.mechanism is Mechanism.RSA_PKCS_OAEP and m.param == (hash_, mgf, None)


@pytest.mark.parametrize(("sign", "decrypt"), [(True, False), (False, True)])
def test_key_templates_have_one_purpose_and_never_leave_the_token(
    sign: bool, decrypt: bool
) -> None:
    priv = templates.rsa_private_key_template(
        "hsmsign:k:v1", b"\x01" * 16, sign=sign, decrypt=decrypt
    )
    pub = templates.rsa_public_key_template(
        "hsmsign:k:v1", b"\x01" * 16, sign=sign, decrypt=decrypt
    )
    assert (
        priv[Attribute.CLASS] is ObjectClass.PRIVATE_KEY
        and pub[Attribute.CLASS] is ObjectClass.PUBLIC_KEY
    )
    assert priv[Attribute.TOKEN] and priv[Attribute.PRIVATE] and priv[Attribute.SENSITIVE]
    assert priv[Attribute.EXTRACTABLE] is False
    assert (priv[Attribute.SIGN], priv[Attribute.DECRYPT], priv[Attribute.UNWRAP]) == (
        sign,
        decrypt,
        decrypt,
    )
    assert priv[Attribute.SIGN_RECOVER] is False and priv[Attribute.DERIVE] is False
    assert (pub[Attribute.VERIFY], pub[Attribute.ENCRYPT], pub[Attribute.WRAP]) == (
        sign,
        decrypt,
        decrypt,
    )


def test_secret_templates() -> None:
    ir = templates.IMPLICIT_REJECTION_SECRET_TEMPLATE
    assert ir[Attribute.SENSITIVE] and ir[Attribute.EXTRACTABLE] is False and ir[Attribute.TOKEN]
    assert [
        a
        for a in (
            Attribute.SIGN,
            Attribute.VERIFY,
            Attribute.ENCRYPT,
            Attribute.DECRYPT,
            Attribute.WRAP,
            Attribute.UNWRAP,
            Attribute.DERIVE,
        )
        if ir[a]
    ] == [Attribute.SIGN]
    unwrapped = templates.SESSION_SECRET_TEMPLATE
    assert unwrapped[Attribute.TOKEN] is False  # a session object, destroyed once read
    assert not any(
        unwrapped[a]
        for a in (
            Attribute.SIGN,
            Attribute.ENCRYPT,
            Attribute.DECRYPT,
            Attribute.WRAP,
            Attribute.UNWRAP,
            Attribute.DERIVE,
        )
    )
