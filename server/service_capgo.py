"""Capgo (capacitor-updater) calls of the Signer service.

Each is ``C_Sign`` with ``CKM_RSA_PKCS`` over raw bytes (OpenSSL's private-encrypt with PKCS#1
type-1 padding, byte-identical to the Capgo CLI), so each checks its input length strictly and
never signs anything but a 16-byte session key or a checksum input derived here from a 32-byte
SHA-256 digest. Only RSA-2048 keys are accepted: capacitor-updater rejects anything else.
"""

from __future__ import annotations

import grpc

import hsmsign.capgo.format as capgo
from hsmsign.v1 import hsmsign_pb2 as pb
from server import operations
from server.config import Config
from server.errors import FailedPrecondition, InvalidArgument
from server.keyring import KeyRing, KeyVersion, Purpose
from server.rpc import key_reference, rpc, used_key
from server.token import Token

_FORMATS: dict[int, capgo.ChecksumFormat] = {
    pb.CHECKSUM_FORMAT_UNSPECIFIED: capgo.ChecksumFormat.V3,
    pb.CHECKSUM_FORMAT_V3: capgo.ChecksumFormat.V3,
    pb.CHECKSUM_FORMAT_V2: capgo.ChecksumFormat.V2,
}
_PB_FORMATS: dict[capgo.ChecksumFormat, pb.ChecksumFormat.ValueType] = {
    capgo.ChecksumFormat.V3: pb.CHECKSUM_FORMAT_V3,
    capgo.ChecksumFormat.V2: pb.CHECKSUM_FORMAT_V2,
}


def _length(name: str, value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise InvalidArgument(f"{name} is {len(value)} bytes; it must be exactly {size} ({what})")
    return value


def _format(value: int) -> capgo.ChecksumFormat:
    fmt = _FORMATS.get(value)
    if fmt is None:
        raise InvalidArgument(f"format {value} is not a ChecksumFormat; use V3 (current) or V2")
    return fmt


def _signing_input(digest: bytes, fmt: capgo.ChecksumFormat, name: str) -> bytes:
    _length(name, digest, 32, "the SHA-256 of the plain bundle zip")
    return capgo.checksum_signing_input(digest, fmt)


class CapgoCalls:
    """Mixed into SignerService; uses its token and key ring."""

    token: Token
    ring: KeyRing
    config: Config

    def _capgo_key(self, ref: pb.KeyRef) -> KeyVersion:
        key = self.ring.resolve(key_reference(ref), Purpose.SIGN)
        if key.bits != capgo.CAPGO_RSA_BITS:
            raise FailedPrecondition(
                f"{key.describe()} is RSA-{key.bits}; capacitor-updater requires RSA-2048 "
                "(devices reject other sizes): use an RSA-2048 key for Capgo bundles"
            )
        return key

    @rpc
    def SealSessionKey(
        self, request: pb.SealSessionKeyRequest, context: grpc.ServicerContext
    ) -> pb.SealSessionKeyResponse:
        block = _length("session_key", request.session_key, 16, "an AES-128 key")
        key = self._capgo_key(request.key)
        (sealed,) = operations.private_encrypt(self.token, key, [block])
        return pb.SealSessionKeyResponse(key=used_key(key), sealed_session_key=sealed)

    @rpc
    def SignChecksum(
        self, request: pb.SignChecksumRequest, context: grpc.ServicerContext
    ) -> pb.SignChecksumResponse:
        fmt = _format(request.format)
        block = _signing_input(request.checksum_sha256, fmt, "checksum_sha256")
        key = self._capgo_key(request.key)
        (sig,) = operations.private_encrypt(self.token, key, [block])
        return pb.SignChecksumResponse(
            key=used_key(key),
            signature=sig,
            signed_checksum=capgo.encode_signed_checksum(sig, fmt),
            format=_PB_FORMATS[fmt],
        )

    @rpc
    def SealBundle(
        self, request: pb.SealBundleRequest, context: grpc.ServicerContext
    ) -> pb.SealBundleResponse:
        fmt = _format(request.format)
        session_key = _length("session_key", request.session_key, 16, "an AES-128 key")
        iv = _length("iv", request.iv, 16, "the AES-CBC IV")
        block = _signing_input(request.checksum_sha256, fmt, "checksum_sha256")
        key = self._capgo_key(request.key)
        sealed, sig = operations.private_encrypt(self.token, key, [session_key, block])
        return pb.SealBundleResponse(
            key=used_key(key),
            iv_session_key=capgo.format_iv_session_key(iv, sealed),
            signed_checksum=capgo.encode_signed_checksum(sig, fmt),
            format=_PB_FORMATS[fmt],
        )

    @rpc
    def SignChecksums(
        self, request: pb.SignChecksumsRequest, context: grpc.ServicerContext
    ) -> pb.SignChecksumsResponse:
        fmt = _format(request.format)
        n = len(request.checksums_sha256)
        if not 0 < n <= operations.MAX_BATCH:
            raise InvalidArgument(f"{n} checksums in one call; send 1 to {operations.MAX_BATCH:,}")
        blocks = [
            _signing_input(d, fmt, f"checksums_sha256[{i}]")
            for i, d in enumerate(request.checksums_sha256)
        ]
        key = self._capgo_key(request.key)
        sigs = operations.private_encrypt(self.token, key, blocks)
        return pb.SignChecksumsResponse(
            key=used_key(key),
            signed_checksums=[capgo.encode_signed_checksum(s, fmt) for s in sigs],
            format=_PB_FORMATS[fmt],
        )
