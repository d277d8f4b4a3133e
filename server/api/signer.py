"""The Signer gRPC servicer: one class composed of a mixin per capability.

Handlers convert requests to domain values, call ``server.operations`` and convert back;
``server.rpc`` holds the decorator that maps errors to status codes.
"""

from __future__ import annotations

import grpc

from hsmsign import keyformats
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server import operations
from server.config import Config
from server.keyring import KeyRing, KeyVersion, Purpose

# Re-exported for the capability mixins.
from server.rpc import key_reference, rpc, scheme_for, used_key
from server.service_capgo import CapgoCalls
from server.service_unwrap import UnwrapCalls
from server.token import Token

__all__ = ["SignerService", "key_reference", "rpc", "used_key"]


class SignerService(CapgoCalls, UnwrapCalls, pb_grpc.SignerServicer):
    """The calls build agents make."""

    def __init__(self, token: Token, ring: KeyRing, config: Config) -> None:
        self.token, self.ring, self.config = token, ring, config
        # Signer calls are side-effect free: server.rpc may run one again after re-reading
        # this ring when the token says a version's object was destroyed meanwhile.
        self.retry_ring = ring
        # Public-key encodings by fingerprint: a version's public key never changes, and
        # build agents ask for it at the start of every upload.
        self._encoded: dict[str, tuple[bytes, str, str]] = {}

    def _signing_key(self, ref: pb.KeyRef) -> KeyVersion:
        return self.ring.resolve(key_reference(ref), Purpose.SIGN)

    @rpc
    def GetPublicKey(
        self, request: pb.GetPublicKeyRequest, context: grpc.ServicerContext
    ) -> pb.GetPublicKeyResponse:
        ref = key_reference(request.key)
        v = self.ring.find(ref)
        encoded = self._encoded.get(v.fingerprint)
        if encoded is None:
            encoded = (
                keyformats.spki_der(v.public_key),
                keyformats.spki_pem(v.public_key),
                keyformats.pkcs1_pem(v.public_key),
            )
            self._encoded[v.fingerprint] = encoded
        der, spki_pem, pkcs1_pem = encoded
        return pb.GetPublicKeyResponse(
            key=used_key(v), spki_der=der, spki_pem=spki_pem, pkcs1_pem=pkcs1_pem
        )

    @rpc
    def SignDigest(
        self, request: pb.SignDigestRequest, context: grpc.ServicerContext
    ) -> pb.SignDigestResponse:
        scheme = scheme_for(request.algorithm)
        key = self._signing_key(request.key)
        sig = operations.sign_digest(self.token, key, scheme, request.digest)
        return pb.SignDigestResponse(key=used_key(key), signature=sig)

    @rpc
    def SignDigests(
        self, request: pb.SignDigestsRequest, context: grpc.ServicerContext
    ) -> pb.SignDigestsResponse:
        scheme = scheme_for(request.algorithm)
        key = self._signing_key(request.key)
        sigs = operations.sign_digests(self.token, key, scheme, list(request.digests))
        return pb.SignDigestsResponse(key=used_key(key), signatures=sigs)
