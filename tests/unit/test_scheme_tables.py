"""The daemon's mechanism tables are keyed by the vocabulary's names, and cover all of them.

server/ops/signing.py and server/ops/unwrap.py hold how each scheme is done in the token;
hsmsign/names.py holds what each scheme is called and its protobuf value. A name in one table
and not the other would be a request the daemon accepts but cannot serve, or the reverse.
"""

from __future__ import annotations

import hashlib

import pytest

from hsmsign import names
from hsmsign.capgo.format import ChecksumFormat
from server.api import convert
from server.errors import InvalidArgument
from server.keyring.model import ALLOWED_BITS, Purpose, State
from server.ops import signing, unwrap
from server.pkcs11.mechanisms import RSA_PKCS


def test_signing_schemes_are_the_signature_algorithms() -> None:
    assert sorted(signing.SCHEMES) == sorted(names.names(names.SIGNATURE_ALGORITHMS))
    for row in names.SIGNATURE_ALGORITHMS:
        scheme = signing.SCHEMES[row.name]
        assert scheme.name == row.name
        assert scheme.digest_size == hashlib.new(row.hash_name).digest_size
        assert (scheme.mech is not RSA_PKCS) == row.pss, row.name


def test_unwrap_schemes_are_the_vocabulary_unwrap_schemes() -> None:
    assert sorted(unwrap.SCHEMES) == sorted(names.names(names.UNWRAP_SCHEMES))
    for row in names.UNWRAP_SCHEMES:
        scheme = unwrap.SCHEMES[row.name]
        assert scheme.name == row.name
        # Only OAEP is a rewrap target: PKCS#1 v1.5 is accepted to unwrap only.
        assert (scheme.oaep_hash is not None) == row.wrap_target, row.name


def test_domain_enums_are_named_by_the_vocabulary() -> None:
    assert [p.value for p in Purpose] == names.names(names.PURPOSES)
    assert [s.value for s in State] == names.names(names.KEY_VERSION_STATES)
    assert sorted(f.value for f in ChecksumFormat) == sorted(names.names(names.CHECKSUM_FORMATS))
    assert tuple(row.bits for row in names.KEY_ALGORITHMS) == ALLOWED_BITS


def test_unknown_enum_values_list_the_allowed_ones_in_enum_order() -> None:
    with pytest.raises(InvalidArgument) as e:
        convert.unwrap_scheme(9, "scheme")
    assert str(e.value) == (
        "scheme 9 is not supported; allowed: UNWRAP_SCHEME_RSA_OAEP_SHA1, "
        "UNWRAP_SCHEME_RSA_OAEP_SHA256, UNWRAP_SCHEME_RSA_PKCS1_V15"
    )
    with pytest.raises(InvalidArgument) as e:
        convert.signature_scheme(0)
    assert str(e.value).startswith(
        "algorithm 0 is not supported; allowed: SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256, "
    )
    assert convert.checksum_format(0) is ChecksumFormat.V3
    assert convert.key_bits(3) == 4096 and convert.purpose(2) is Purpose.UNWRAP
