"""A Capgo sealer whose private key lives in the HSM, behind hsmsignd."""

from __future__ import annotations

from collections.abc import Sequence

from hsmsign.capgo.bundle import BundleSeal
from hsmsign.capgo.format import ChecksumFormat, decode_signed_checksum
from hsmsign.client import Client, KeyInfo, key_ref, seal_bundle, seal_session_key, sign_checksums
from hsmsign.errors import RemoteError, UsageError
from hsmsign.v1 import hsmsign_pb2 as pb


class DaemonSealer:
    """Seals and signs through hsmsignd with one key version for the whole release.

    The daemon checks the key (a sign key, RSA-2048) on every call and reports the version
    it used: the first answer pins that version for the rest of the release, so a rotation
    landing mid-release cannot mix versions. A whole bundle takes one SealBundle call.
    """

    def __init__(self, client: Client, key: str | pb.KeyRef) -> None:
        self._client = client
        self._ref = key_ref(key)
        self._key: KeyInfo | None = None

    @property
    def key(self) -> KeyInfo:
        """The key version this release uses. Raises UsageError before the first call."""
        if self._key is None:
            raise UsageError("no key version is pinned yet: nothing was sealed or signed")
        return self._key

    def _pin(self, used: KeyInfo) -> None:
        if self._key is None:
            self._key = used
            self._ref = pb.KeyRef(name=used.name, version=used.version)
        elif used.fingerprint != self._key.fingerprint:
            raise RemoteError("ABORTED", "the key changed during the release; run again")

    def fetch_public_pem(self) -> str:
        """The PKCS#1 public PEM of the key (GetPublicKey), pinning its version."""
        pk = self._client.public_key(self._ref)
        self._pin(pk.key)
        return pk.pkcs1_pem

    def seal_bundle(
        self, session_key: bytes, iv: bytes, digest: bytes, fmt: ChecksumFormat
    ) -> BundleSeal:
        """SealBundle: the two upload fields, encoded by the daemon, in one call."""
        r = seal_bundle(self._client, self._ref, session_key, iv, digest, fmt.value)
        self._pin(r.key)
        return BundleSeal(r.iv_session_key, r.signed_checksum, r.key.capgo_key_id)

    def seal_session_key(self, session_key: bytes) -> bytes:
        s = seal_session_key(self._client, self._ref, session_key)
        self._pin(s.key)
        return s.signature

    def sign_checksum(self, digest: bytes, fmt: ChecksumFormat) -> bytes:
        return self.sign_checksums([digest], fmt)[0]

    def sign_checksums(self, digests: Sequence[bytes], fmt: ChecksumFormat) -> list[bytes]:
        used, signed = sign_checksums(self._client, self._ref, digests, fmt.value)
        self._pin(used)
        return [decode_signed_checksum(s) for s in signed]
