"""Capgo (capacitor-updater) calls of the Signer service (a base class of ``SignerService``).

The operations and their strict input checks are in ``server.ops.capgo``.
"""

from __future__ import annotations

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from server.api.convert import checksum_format, checksum_format_pb, key_reference, used_key
from server.api.pipeline import rpc
from server.config import Config
from server.keyring.ring import KeyRing
from server.ops import capgo
from server.pkcs11.token import Token


class CapgoCalls:
    """Mixed into SignerService; uses its token and key ring."""

    token: Token
    ring: KeyRing
    config: Config

    @rpc
    def SealSessionKey(
        self, request: pb.SealSessionKeyRequest, context: grpc.ServicerContext
    ) -> pb.SealSessionKeyResponse:
        key, sealed = capgo.seal_session_key(
            self.token, self.ring, key_reference(request.key), request.session_key
        )
        return pb.SealSessionKeyResponse(key=used_key(key), sealed_session_key=sealed)

    @rpc
    def SignChecksum(
        self, request: pb.SignChecksumRequest, context: grpc.ServicerContext
    ) -> pb.SignChecksumResponse:
        fmt = checksum_format(request.format)
        key, sig = capgo.sign_checksum(
            self.token, self.ring, key_reference(request.key), request.checksum_sha256, fmt
        )
        return pb.SignChecksumResponse(
            key=used_key(key),
            signature=sig,
            signed_checksum=capgo.encode_signed_checksum(sig, fmt),
            format=checksum_format_pb(fmt),
        )

    @rpc
    def SealBundle(
        self, request: pb.SealBundleRequest, context: grpc.ServicerContext
    ) -> pb.SealBundleResponse:
        fmt = checksum_format(request.format)
        key, iv_session_key, signed_checksum = capgo.seal_bundle(
            self.token,
            self.ring,
            key_reference(request.key),
            request.session_key,
            request.iv,
            request.checksum_sha256,
            fmt,
        )
        return pb.SealBundleResponse(
            key=used_key(key),
            iv_session_key=iv_session_key,
            signed_checksum=signed_checksum,
            format=checksum_format_pb(fmt),
        )

    @rpc
    def SignChecksums(
        self, request: pb.SignChecksumsRequest, context: grpc.ServicerContext
    ) -> pb.SignChecksumsResponse:
        fmt = checksum_format(request.format)
        key, signed = capgo.sign_checksums(
            self.token, self.ring, key_reference(request.key), list(request.checksums_sha256), fmt
        )
        return pb.SignChecksumsResponse(
            key=used_key(key), signed_checksums=signed, format=checksum_format_pb(fmt)
        )
