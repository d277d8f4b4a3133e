"""The Signer gRPC servicer: one class composed of a mixin per capability.

Handlers convert requests to domain values (``server.api.convert``), call ``server.ops`` and
convert back; every handler runs inside the call pipeline (``server.api.pipeline.rpc``).
"""

from __future__ import annotations

import grpc

from hsmsign import keyformats
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from server.api.capgo import CapgoCalls
from server.api.convert import key_reference, signature_scheme, used_key
from server.api.pipeline import rpc
from server.api.unwrap import UnwrapCalls
from server.config import Config
from server.keyring.model import KeyVersion, Purpose
from server.keyring.ring import KeyRing
from server.ops import signing
from server.pkcs11.token import Token


class SignerService(CapgoCalls, UnwrapCalls, pb_grpc.SignerServicer):
    """The calls build agents make."""

    def __init__(self, token: Token, ring: KeyRing, config: Config) -> None:
        self.token, self.ring, self.config = token, ring, config
        # Signer calls are side-effect free: the pipeline may run one again after re-reading
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
        scheme = signature_scheme(request.algorithm)
        key = self._signing_key(request.key)
        sig = signing.sign_digest(self.token, key, scheme, request.digest)
        return pb.SignDigestResponse(key=used_key(key), signature=sig)

    @rpc
    def SignDigests(
        self, request: pb.SignDigestsRequest, context: grpc.ServicerContext
    ) -> pb.SignDigestsResponse:
        scheme = signature_scheme(request.algorithm)
        key = self._signing_key(request.key)
        sigs = signing.sign_digests(self.token, key, scheme, list(request.digests))
        return pb.SignDigestsResponse(key=used_key(key), signatures=sigs)
