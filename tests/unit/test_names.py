"""The vocabulary tables: every protobuf enum value has exactly one CLI name, and back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from hsmsign import names
from hsmsign.capgo.format import ChecksumFormat
from hsmsign.v1 import hsmsign_pb2 as pb

TABLES: list[tuple[Sequence[names.Named[int]], Any]] = [
    (names.SIGNATURE_ALGORITHMS, pb.SignatureAlgorithm),
    (names.KEY_ALGORITHMS, pb.KeyAlgorithm),
    (names.UNWRAP_SCHEMES, pb.UnwrapScheme),
    (names.CHECKSUM_FORMATS, pb.ChecksumFormat),
    (names.PURPOSES, pb.KeyPurpose),
    (names.KEY_VERSION_STATES, pb.KeyVersionState),
]


@pytest.mark.parametrize(("table", "enum"), TABLES, ids=lambda t: getattr(t, "DESCRIPTOR", t))
def test_every_enum_value_has_one_name(table: Sequence[names.Named[int]], enum: Any) -> None:
    values = [v for v in enum.values() if not enum.Name(v).endswith("_UNSPECIFIED")]
    assert sorted(row.pb for row in table) == sorted(values)
    assert len({row.name for row in table}) == len(table)
    for row in table:
        assert names.by_name(table, row.name, "x") is row
        assert names.by_pb(table, row.pb) is row
    assert names.name_of(table, 0) == names.UNSPECIFIED


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(names.UnknownName, match="choose from rsa-2048, rsa-3072, rsa-4096"):
        names.by_name(names.KEY_ALGORITHMS, "rsa-1024", "algorithm")


@pytest.mark.parametrize(
    ("name", "hash_name", "pss"),
    [("rsa-pkcs1-sha256", "sha256", False), ("rsa-pss-sha512", "sha512", True)],
)
def test_signature_algorithm_rows(name: str, hash_name: str, pss: bool) -> None:
    row = names.by_name(names.SIGNATURE_ALGORITHMS, name, "algorithm")
    assert (row.hash_name, row.pss) == (hash_name, pss)


def test_checksum_format_enum_follows_the_table() -> None:
    for fmt in ChecksumFormat:
        assert ChecksumFormat.from_pb(fmt.pb) is fmt
        assert ChecksumFormat.from_name(fmt.value) is fmt
    assert ChecksumFormat.from_pb(pb.CHECKSUM_FORMAT_UNSPECIFIED) is None
