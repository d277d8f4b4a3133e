"""Conversions between API messages (``hsmsign.v1``) and the daemon's domain values.

Each enum table is the daemon's one mapping for its concept; an unknown or unset value is an
INVALID_ARGUMENT that lists what is allowed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

import hsmsign.capgo.format as capgo
from hsmsign import keyformats
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

_SIGNATURE_ALGORITHMS: Final[dict[int, str]] = {
    pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256: "rsa-pkcs1-sha256",
    pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA384: "rsa-pkcs1-sha384",
    pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512: "rsa-pkcs1-sha512",
    pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256: "rsa-pss-sha256",
    pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA384: "rsa-pss-sha384",
    pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA512: "rsa-pss-sha512",
}


def signature_scheme(algorithm: int) -> signing.SignatureScheme:
    """The signing scheme of a SignatureAlgorithm; INVALID_ARGUMENT when unset or unknown."""
    name = _SIGNATURE_ALGORITHMS.get(algorithm)
    if name is None:
        allowed = ", ".join(pb.SignatureAlgorithm.Name(a) for a in _SIGNATURE_ALGORITHMS)  # type: ignore[arg-type]
        raise InvalidArgument(f"algorithm {algorithm} is not supported; allowed: {allowed}")
    return signing.SCHEMES[name]


_UNWRAP_SCHEMES: Final[dict[int, str]] = {
    pb.UNWRAP_SCHEME_RSA_OAEP_SHA1: "rsa-oaep-sha1",
    pb.UNWRAP_SCHEME_RSA_OAEP_SHA256: "rsa-oaep-sha256",
    pb.UNWRAP_SCHEME_RSA_PKCS1_V15: "rsa-pkcs1v15",
}


def unwrap_scheme(value: int, field: str) -> unwrap.UnwrapScheme:
    """The domain scheme for an UnwrapScheme value; INVALID_ARGUMENT when unset or unknown."""
    name = _UNWRAP_SCHEMES.get(value)
    if name is None:
        allowed = ", ".join(pb.UnwrapScheme.Name(v) for v in _UNWRAP_SCHEMES)  # type: ignore[arg-type]
        raise InvalidArgument(f"{field} {value} is not supported; allowed: {allowed}")
    return unwrap.SCHEMES[name]


_CHECKSUM_FORMATS: Final[dict[int, capgo.ChecksumFormat]] = {
    pb.CHECKSUM_FORMAT_UNSPECIFIED: capgo.ChecksumFormat.V3,
    pb.CHECKSUM_FORMAT_V3: capgo.ChecksumFormat.V3,
    pb.CHECKSUM_FORMAT_V2: capgo.ChecksumFormat.V2,
}
_CHECKSUM_FORMATS_PB: Final[dict[capgo.ChecksumFormat, pb.ChecksumFormat.ValueType]] = {
    capgo.ChecksumFormat.V3: pb.CHECKSUM_FORMAT_V3,
    capgo.ChecksumFormat.V2: pb.CHECKSUM_FORMAT_V2,
}


def checksum_format(value: int) -> capgo.ChecksumFormat:
    """The Capgo checksum format of a ChecksumFormat (unset: V3); INVALID_ARGUMENT if unknown."""
    fmt = _CHECKSUM_FORMATS.get(value)
    if fmt is None:
        raise InvalidArgument(f"format {value} is not a ChecksumFormat; use V3 (current) or V2")
    return fmt


def checksum_format_pb(fmt: capgo.ChecksumFormat) -> pb.ChecksumFormat.ValueType:
    return _CHECKSUM_FORMATS_PB[fmt]


# -- keys (KeyAdmin) ----------------------------------------------------------------------------

_PURPOSES: Final[dict[pb.KeyPurpose.ValueType, Purpose]] = {
    pb.KEY_PURPOSE_SIGN: Purpose.SIGN,
    pb.KEY_PURPOSE_UNWRAP: Purpose.UNWRAP,
}
_PURPOSES_PB: Final = {v: k for k, v in _PURPOSES.items()}
_KEY_ALGORITHMS: Final[dict[pb.KeyAlgorithm.ValueType, int]] = {
    pb.KEY_ALGORITHM_RSA_2048: 2048,
    pb.KEY_ALGORITHM_RSA_3072: 3072,
    pb.KEY_ALGORITHM_RSA_4096: 4096,
}
_KEY_ALGORITHMS_PB: Final = {v: k for k, v in _KEY_ALGORITHMS.items()}
_STATES_PB: Final[dict[State, pb.KeyVersionState.ValueType]] = {
    State.ENABLED: pb.KEY_VERSION_STATE_ENABLED,
    State.DISABLED: pb.KEY_VERSION_STATE_DISABLED,
    State.DESTRUCTION_SCHEDULED: pb.KEY_VERSION_STATE_DESTRUCTION_SCHEDULED,
    State.DESTROYED: pb.KEY_VERSION_STATE_DESTROYED,
}


def purpose(value: int, field: str = "purpose") -> Purpose:
    """The purpose of a KeyPurpose; INVALID_ARGUMENT when unset or unknown."""
    try:
        return _PURPOSES[pb.KeyPurpose.ValueType(value)]
    except KeyError:
        raise InvalidArgument(
            f"{field} must be KEY_PURPOSE_SIGN or KEY_PURPOSE_UNWRAP (got {value})"
        ) from None


def key_bits(value: int) -> int:
    """The RSA size of a KeyAlgorithm; INVALID_ARGUMENT when unset or unknown."""
    try:
        return _KEY_ALGORITHMS[pb.KeyAlgorithm.ValueType(value)]
    except KeyError:
        raise InvalidArgument(
            "algorithm must be KEY_ALGORITHM_RSA_2048, _3072 or _4096 "
            f"(got {value}); Capgo needs RSA-2048"
        ) from None


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
        state=_STATES_PB[v.state],
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
        purpose=_PURPOSES_PB[key.purpose],
        algorithm=_KEY_ALGORITHMS_PB.get(key.bits, pb.KEY_ALGORITHM_UNSPECIFIED),
        primary_version=key.primary.version if key.primary else 0,
        versions=[version_to_pb(v) for v in key.versions],
    )
