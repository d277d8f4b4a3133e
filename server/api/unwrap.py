"""The UnwrapSessionKey and RewrapSessionKey handlers, a base class of ``SignerService``.

Unwrap is its own operation, never reachable through a signing call (and a key version has
one purpose), so an access policy can grant it separately. Logs carry the key version, the
scheme and a SHA-256 prefix of the wrapped input, never the input or the session key.
"""

from __future__ import annotations

import hashlib
import logging

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from server.api.convert import key_reference, unwrap_scheme, used_key
from server.api.pipeline import rpc
from server.config import Config
from server.keyring.model import Purpose
from server.keyring.ring import KeyRing
from server.ops import unwrap
from server.pkcs11.token import Token

log = logging.getLogger(__name__)


def _input_digest(wrapped: bytes) -> str:
    return hashlib.sha256(wrapped).hexdigest()[:16]


class UnwrapCalls:
    """Session-key unwrap and rewrap: mixed into SignerService, which sets these attributes."""

    token: Token
    ring: KeyRing
    config: Config

    @rpc
    def UnwrapSessionKey(
        self, request: pb.UnwrapSessionKeyRequest, context: grpc.ServicerContext
    ) -> pb.UnwrapSessionKeyResponse:
        scheme = unwrap_scheme(request.scheme, "scheme")
        key = self.ring.resolve(key_reference(request.key), Purpose.UNWRAP)
        session_key = unwrap.unwrap_session_key(
            self.token, key, scheme, request.wrapped_key, self.config.key_options(key.name)
        )
        log.info(
            "unwrap %s v%d %s input sha256:%s",
            key.name,
            key.version,
            scheme.name,
            _input_digest(request.wrapped_key),
        )
        return pb.UnwrapSessionKeyResponse(key=used_key(key), session_key=session_key)

    @rpc
    def RewrapSessionKey(
        self, request: pb.RewrapSessionKeyRequest, context: grpc.ServicerContext
    ) -> pb.RewrapSessionKeyResponse:
        from_scheme = unwrap_scheme(request.from_scheme, "from_scheme")
        to_scheme = unwrap_scheme(request.to_scheme, "to_scheme")
        from_key = self.ring.resolve(key_reference(request.from_key, "from_key"), Purpose.UNWRAP)
        to_key = self.ring.resolve(key_reference(request.to_key, "to_key"), Purpose.UNWRAP)
        rewrapped = unwrap.rewrap_session_key(
            self.token,
            from_key,
            from_scheme,
            request.wrapped_key,
            to_key,
            to_scheme,
            self.config.key_options(from_key.name),
        )
        log.info(
            "rewrap %s v%d %s -> %s v%d %s input sha256:%s",
            from_key.name,
            from_key.version,
            from_scheme.name,
            to_key.name,
            to_key.version,
            to_scheme.name,
            _input_digest(request.wrapped_key),
        )
        return pb.RewrapSessionKeyResponse(
            from_key=used_key(from_key), to_key=used_key(to_key), wrapped_key=rewrapped
        )
