"""Conversions between API messages (``hsmsign.v1``) and the daemon's domain values.

Every enum mapping comes from the rows of :mod:`hsmsign.names` (the one vocabulary table per
concept); an unknown or unset value is an INVALID_ARGUMENT that lists what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

import hsmsign.capgo.format as capgo
from hsmsign import keyformats, names
from hsmsign.v1 import hsmsign_pb2 as pb
from server.api.pipeline import note_key_used
from server.errors import InvalidArgument
from server.keyring.model import Key, KeyReference, KeyVersion, Purpose, State
from server.ops import signing, unwrap

# -- references and the key a call used -------------------------------------------------------


def key_reference(ref: pb.KeyRef, field: str = "key") -> KeyReference:
    """The domain reference for a KeyRef; INVALID_ARGUMENT when it names nothing."""
    which = ref.WhichOneof("selector")
    if which is None:
        raise InvalidArgument(
            f"{field} is missing: set {field}.name, {field}.fingerprint or {field}.capgo_key_id"
        )
    if ref.version and which != "name":
        raise InvalidArgument(f"{field}.version goes only with {field}.name")
    if which == "name":
        if not ref.name:
            raise InvalidArgument(f"{field}.name is empty")
        return KeyReference(name=ref.name, version=ref.version)
    if which == "fingerprint":
        fp = ref.fingerprint.lower().removeprefix("sha256:")
        if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
            raise InvalidArgument(f"{field}.fingerprint must be 64 hex characters (SHA-256)")
        return KeyReference(fingerprint=fp)
    if not ref.capgo_key_id:
        raise InvalidArgument(f"{field}.capgo_key_id is empty")
    return KeyReference(capgo_key_id=ref.capgo_key_id)


def used_key(v: KeyVersion) -> pb.UsedKey:
    """The UsedKey of a response; also records the version for the call's access-log line
    and audit record."""
    note_key_used(v.name, v.version, v.fingerprint)
    return pb.UsedKey(
        name=v.name,
        version=v.version,
        fingerprint=v.fingerprint,
        capgo_key_id=v.capgo_key_id,
        modulus_bits=v.bits,
    )


# -- signature algorithms, unwrap schemes, checksum formats -----------------------------------
# Every enum <-> name mapping is a row of hsmsign.names; the ops tables are keyed by those names.


def _allowed(table: Sequence[names.Named[int]], enum_name: Callable[[Any], str]) -> str:
    """The enum names of a table's rows in enum order, for an INVALID_ARGUMENT message."""
    return ", ".join(enum_name(v) for v in sorted(row.pb for row in table))


def signature_scheme(algorithm: int) -> signing.SignatureScheme:
    """The signing scheme of a SignatureAlgorithm; INVALID_ARGUMENT when unset or unknown."""
    row = names.by_pb(names.SIGNATURE_ALGORITHMS, algorithm)
    if row is None:
        allowed = _allowed(names.SIGNATURE_ALGORITHMS, pb.SignatureAlgorithm.Name)
        raise InvalidArgument(f"algorithm {algorithm} is not supported; allowed: {allowed}")
    return signing.SCHEMES[row.name]


def unwrap_scheme(value: int, field: str) -> unwrap.UnwrapScheme:
    """The domain scheme for an UnwrapScheme value; INVALID_ARGUMENT when unset or unknown."""
    row = names.by_pb(names.UNWRAP_SCHEMES, value)
    if row is None:
        allowed = _allowed(names.UNWRAP_SCHEMES, pb.UnwrapScheme.Name)
        raise InvalidArgument(f"{field} {value} is not supported; allowed: {allowed}")
    return unwrap.SCHEMES[row.name]


def checksum_format(value: int) -> capgo.ChecksumFormat:
    """The Capgo checksum format of a ChecksumFormat (unset: V3); INVALID_ARGUMENT if unknown."""
    if value == pb.CHECKSUM_FORMAT_UNSPECIFIED:
        return capgo.ChecksumFormat(names.DEFAULT_CHECKSUM_FORMAT)
    row = names.by_pb(names.CHECKSUM_FORMATS, value)
    if row is None:
        raise InvalidArgument(f"format {value} is not a ChecksumFormat; use V3 (current) or V2")
    return capgo.ChecksumFormat(row.name)


def checksum_format_pb(fmt: capgo.ChecksumFormat) -> pb.ChecksumFormat.ValueType:
    return names.by_name(names.CHECKSUM_FORMATS, fmt.value, "checksum format").pb


# -- keys (KeyAdmin) ----------------------------------------------------------------------------


def purpose(value: int, field: str = "purpose") -> Purpose:
    """The purpose of a KeyPurpose; INVALID_ARGUMENT when unset or unknown."""
    row = names.by_pb(names.PURPOSES, value)
    if row is None:
        raise InvalidArgument(
            f"{field} must be KEY_PURPOSE_SIGN or KEY_PURPOSE_UNWRAP (got {value})"
        )
    return Purpose(row.name)


def key_bits(value: int) -> int:
    """The RSA size of a KeyAlgorithm; INVALID_ARGUMENT when unset or unknown."""
    row = names.by_pb(names.KEY_ALGORITHMS, value)
    if row is None:
        raise InvalidArgument(
            "algorithm must be KEY_ALGORITHM_RSA_2048, _3072 or _4096 "
            f"(got {value}); Capgo needs RSA-2048"
        )
    return row.bits


def _key_algorithm_pb(bits: int) -> pb.KeyAlgorithm.ValueType:
    """The KeyAlgorithm of an RSA size; UNSPECIFIED for a size hsmsign does not offer."""
    for row in names.KEY_ALGORITHMS:
        if row.bits == bits:
            return row.pb
    return pb.KEY_ALGORITHM_UNSPECIFIED


def version_number(value: int) -> int:
    """A key version number from a request; INVALID_ARGUMENT when unset."""
    if value == 0:
        raise InvalidArgument("version is required (1, 2, ...)")
    return value


def _timestamp(t: datetime | None) -> Timestamp | None:
    if t is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(t)
    return ts


def version_to_pb(v: KeyVersion) -> pb.KeyVersion:
    destroyed = v.state is State.DESTROYED
    out = pb.KeyVersion(
        version=v.version,
        state=names.by_name(names.KEY_VERSION_STATES, v.state.value, "key state").pb,
        fingerprint=v.fingerprint,
        capgo_key_id=v.capgo_key_id,
        provenance=pb.Provenance(
            local=v.info.local,
            never_extractable=v.info.never_extractable,
            always_sensitive=v.info.always_sensitive,
            extractable=v.info.extractable,
            sensitive=v.info.sensitive,
            imported=v.imported,
        )
        if not destroyed
        else pb.Provenance(imported=v.imported),
        spki_pem=keyformats.spki_pem(v.public_key),
        pkcs1_pem=keyformats.pkcs1_pem(v.public_key),
        primary=v.primary,
    )
    created = _timestamp(v.created_at)
    if created is not None:
        out.created_at.CopyFrom(created)
    destroy_at = _timestamp(v.destroy_at)
    if destroy_at is not None and v.state in (State.DESTRUCTION_SCHEDULED, State.DESTROYED):
        out.destroy_at.CopyFrom(destroy_at)
    return out


def key_to_pb(key: Key) -> pb.Key:
    return pb.Key(
        name=key.name,
        purpose=names.by_name(names.PURPOSES, key.purpose.value, "purpose").pb,
        algorithm=_key_algorithm_pb(key.bits),
        primary_version=key.primary.version if key.primary else 0,
        versions=[version_to_pb(v) for v in key.versions],
    )
