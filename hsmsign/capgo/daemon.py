"""A Capgo :class:`~hsmsign.capgo.Sealer` whose private key lives in the HSM, behind hsmsignd."""

from __future__ import annotations

from collections.abc import Sequence

from hsmsign import capgo
from hsmsign.client import (
    Client,
    KeyInfo,
    seal_session_key,
    sign_checksums,
)
from hsmsign.errors import UsageError
from hsmsign.v1 import hsmsign_pb2 as pb

_FORMAT_NAMES = {capgo.ChecksumFormat.V3: "v3", capgo.ChecksumFormat.V2: "v2"}


class DaemonSealer:
    """Seals and signs through hsmsignd with one key version for the whole release.

    The version is pinned when the sealer is made, so a rotation landing mid-release cannot
    mix versions. It is :class:`~hsmsign.capgo.PublicKeyAware`: the library checks every
    result against the public key before using it.
    """

    def __init__(self, client: Client, key: str) -> None:
        self._client = client
        pk = client.public_key(key)
        if pk.key.modulus_bits != capgo.CAPGO_RSA_BITS:
            raise UsageError(
                f"key {pk.key.name} v{pk.key.version} is RSA-{pk.key.modulus_bits}; "
                "capacitor-updater requires RSA-2048"
            )
        self.key: KeyInfo = pk.key
        self._ref = pb.KeyRef(name=pk.key.name, version=pk.key.version)
        self._pem = pk.pkcs1_pem

    @property
    def public_pem(self) -> str:
        return self._pem

    def seal_session_key(self, session_key: bytes) -> bytes:
        return seal_session_key(self._client, self._ref, session_key).signature

    def sign_checksum(self, digest: bytes, fmt: capgo.ChecksumFormat) -> bytes:
        return capgo.decode_signed_checksum(self.sign_checksums_encoded([digest], fmt)[0])

    def sign_checksums(self, digests: Sequence[bytes], fmt: capgo.ChecksumFormat) -> list[bytes]:
        return [capgo.decode_signed_checksum(s) for s in self.sign_checksums_encoded(digests, fmt)]

    def sign_checksums_encoded(
        self, digests: Sequence[bytes], fmt: capgo.ChecksumFormat
    ) -> list[str]:
        _, signed = sign_checksums(self._client, self._ref, digests, _FORMAT_NAMES[fmt])
        return signed
