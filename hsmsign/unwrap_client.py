"""Client calls for session-key unwrap and rewrap (functions over a :class:`Client`).

Scheme names (:data:`hsmsign.names.UNWRAP_SCHEMES`): ``rsa-oaep-sha256`` (Capgo's v1 scheme,
most HSMs), ``rsa-oaep-sha1`` (what SoftHSM2 2.6.1 can do) and ``rsa-pkcs1v15`` (legacy; the
daemon must enable it per key and then answers a bad padding with a pseudo-random key
instead of an error).
Every call raises :class:`hsmsign.errors.RemoteError` on a non-OK status.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hsmsign import names
from hsmsign.client import Client, KeyInfo, choose, key_ref
from hsmsign.v1 import hsmsign_pb2 as pb


@dataclass(frozen=True)
class UnwrappedKey:
    key: KeyInfo
    #: The session key; kept out of repr() so it does not end up in logs by accident.
    session_key: bytes = field(repr=False)


@dataclass(frozen=True)
class RewrappedKey:
    from_key: KeyInfo
    to_key: KeyInfo
    wrapped_key: bytes


def unwrap_scheme(name: str) -> pb.UnwrapScheme.ValueType:
    return choose(names.UNWRAP_SCHEMES, name, "unwrap scheme").pb


def unwrap_session_key(
    client: Client, key: str | pb.KeyRef, wrapped: bytes, scheme: str = names.DEFAULT_UNWRAP_SCHEME
) -> UnwrappedKey:
    """The session key ``wrapped`` carries, unwrapped by the daemon with an unwrap key."""
    req = pb.UnwrapSessionKeyRequest(
        key=key_ref(key), wrapped_key=wrapped, scheme=unwrap_scheme(scheme)
    )
    r = client.call(lambda: client.signer.UnwrapSessionKey(req, timeout=client.timeout))
    return UnwrappedKey(KeyInfo.from_pb(r.key), r.session_key)


def rewrap_session_key(
    client: Client,
    from_key: str | pb.KeyRef,
    wrapped: bytes,
    to_key: str | pb.KeyRef,
    *,
    from_scheme: str = names.DEFAULT_UNWRAP_SCHEME,
    to_scheme: str = names.DEFAULT_UNWRAP_SCHEME,
) -> RewrappedKey:
    """``wrapped`` re-encrypted to ``to_key``; the session key never reaches this process."""
    req = pb.RewrapSessionKeyRequest(
        from_key=key_ref(from_key),
        wrapped_key=wrapped,
        from_scheme=unwrap_scheme(from_scheme),
        to_key=key_ref(to_key),
        to_scheme=unwrap_scheme(to_scheme),
    )
    r = client.call(lambda: client.signer.RewrapSessionKey(req, timeout=client.timeout))
    return RewrappedKey(KeyInfo.from_pb(r.from_key), KeyInfo.from_pb(r.to_key), r.wrapped_key)
