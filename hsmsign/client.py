"""The thin client library: a typed wrapper over the gRPC API.

Build agents use this (or the ``hsmsign`` CLI, which uses it). It never imports python-pkcs11.
Every call raises :class:`hsmsign.errors.RemoteError` (status name + the daemon's one-line
message) instead of a raw ``grpc.RpcError``.
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from hsmsign import connection, names
from hsmsign._internal import plaintext
from hsmsign.errors import RemoteError, UsageError
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc

T = TypeVar("T")
R = TypeVar("R", bound=names.Named[int])

DEFAULT_SERVER = "127.0.0.1:50051"
#: Seconds each call may take, retries on other replicas included (CLI: --timeout).
DEFAULT_TIMEOUT = 30.0


def parse_key_ref(text: str) -> pb.KeyRef:
    """``NAME``, ``NAME@VERSION``, ``sha256:FINGERPRINT`` or ``keyid:CAPGO_KEY_ID``."""
    if not text:
        raise UsageError("empty key reference; use NAME, NAME@VERSION, sha256:HEX or keyid:ID")
    if text.startswith("sha256:"):
        return pb.KeyRef(fingerprint=text[len("sha256:") :])
    if text.startswith("keyid:"):
        return pb.KeyRef(capgo_key_id=text[len("keyid:") :])
    name, sep, version = text.partition("@")
    if sep:
        if not version.isdigit() or int(version) == 0:
            raise UsageError(f"bad key version in {text!r}: use NAME@1, NAME@2, ...")
        return pb.KeyRef(name=name, version=int(version))
    return pb.KeyRef(name=name)


def key_ref(key: str | pb.KeyRef) -> pb.KeyRef:
    """A KeyRef as is, or parsed from its text form (see parse_key_ref)."""
    return parse_key_ref(key) if isinstance(key, str) else key


def choose(table: Sequence[R], name: str, what: str) -> R:
    """The row of a :mod:`hsmsign.names` table called ``name``, or a UsageError listing what
    is allowed."""
    try:
        return names.by_name(table, name, what)
    except names.UnknownName as e:
        raise UsageError(str(e)) from None


@dataclass(frozen=True)
class KeyInfo:
    """Which key version produced a result."""

    name: str
    version: int
    fingerprint: str
    capgo_key_id: str
    modulus_bits: int

    @classmethod
    def from_pb(cls, k: pb.UsedKey) -> KeyInfo:
        return cls(k.name, k.version, k.fingerprint, k.capgo_key_id, k.modulus_bits)


@dataclass(frozen=True)
class PublicKey:
    key: KeyInfo
    spki_der: bytes
    spki_pem: str
    pkcs1_pem: str


@dataclass(frozen=True)
class Signature:
    key: KeyInfo
    signature: bytes


@dataclass(frozen=True)
class TlsOptions:
    """Server CA to trust, and an optional client certificate for mutual TLS."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials; UsageError for a missing, unreadable or mismatched file.

        Everything is checked here because gRPC's C core aborts the whole process (SIGABRT)
        on a client certificate without its key, instead of raising."""
        if (self.cert is None) != (self.key is None):
            given, missing, flag = (
                ("certificate", "key", "--tls-key or HSMSIGN_TLS_KEY")
                if self.cert
                else ("key", "certificate", "--tls-cert or HSMSIGN_TLS_CERT")
            )
            raise UsageError(
                f"mutual TLS needs the client certificate and its private key; only the "
                f"{given} was given (add the {missing}: {flag})"
            )
        try:
            ca = self.ca.read_bytes()
            cert = self.cert.read_bytes() if self.cert else None
            key = self.key.read_bytes() if self.key else None
        except OSError as e:
            raise UsageError(f"cannot read {e.filename}: {e.strerror}") from None
        from hsmsign import tlsfiles

        problem = tlsfiles.problem(
            ca, cert, key, ca_name=str(self.ca), cert_name=str(self.cert), key_name=str(self.key)
        )
        if problem:
            raise UsageError(problem)
        return grpc.ssl_channel_credentials(ca, key, cert)


def read_token_file(path: Path) -> str:
    """The OIDC ID token in ``path`` (CI systems write one per job), surrounding whitespace
    removed. Raises UsageError, never naming the token, for an unreadable, empty or multi-line
    file."""
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read the OIDC token file {path}: {why}") from None
    return check_token(text.strip(), f"the OIDC token file {path}")


def check_token(token: str, source: str) -> str:
    """``token`` if it can be sent as one ``authorization`` header; UsageError naming
    ``source`` (never the token) otherwise."""
    if not token:
        raise UsageError(f"{source} is empty")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise UsageError(f"{source} holds more than one token (whitespace inside)")
    return token


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer`` to every call on a plaintext channel to this machine;
    gRPC's call credentials refuse to travel without TLS, which is right everywhere else."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


def _call(fn: Callable[[], T], tls_hint: str = "") -> T:
    try:
        return fn()
    except grpc.RpcError as e:
        raise connection.remote_error(e, tls_hint) from None


def _tls_hint(tls: TlsOptions | None) -> str:
    if tls is None:
        return (
            "if the daemon uses TLS, pass --tls-ca, and --tls-cert/--tls-key for client "
            "certificates"
        )
    if tls.cert is None:
        return "if the daemon requires client certificates, pass --tls-cert and --tls-key"
    return (
        "check that --tls-ca signed the daemon's certificate, that the daemon's client_ca "
        "signed yours, and the name the daemon's certificate carries (--tls-server-name)"
    )


class Client:
    """A connection to hsmsignd. Thread-safe; use one per process and close it (or ``with``).

    It holds ``connections`` channels to the target and sends each Signer call to the next one
    in turn; with more than one, many threads sharing one Client reach every serving process
    of a daemon (hsmsign.connection). KeyAdmin calls all go over the first channel."""

    def __init__(
        self,
        target: str | None = None,
        tls: TlsOptions | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        oidc_token: str | None = None,
        connections: int | None = None,
    ) -> None:
        """``target``: one address, several, or a DNS name (hsmsign.connection); ``timeout``:
        the deadline of each call in seconds, retries included; ``oidc_token``: a CI job's
        OIDC ID token, sent as ``authorization: Bearer`` with every call; ``connections``:
        channels to open (default ``HSMSIGN_CONNECTIONS``, else
        ``connection.DEFAULT_CONNECTIONS``). Raises UsageError for a bad target, TLS file or
        number of connections, and for a token on a plaintext channel to another machine (a
        bearer token read on the way is a stolen identity)."""
        self.target = target or os.environ.get("HSMSIGN_SERVER") or DEFAULT_SERVER
        self.timeout = timeout
        if connections is None:
            env = os.environ.get("HSMSIGN_CONNECTIONS")
            connections = (
                connection.parse_connections(env, "HSMSIGN_CONNECTIONS")
                if env
                else connection.DEFAULT_CONNECTIONS
            )
        #: Channels (each its own connection to every address) that Signer calls take in turn.
        self.connections = connection.check_connections(connections)
        #: No TLS: what the channel carries can be read on its way.
        self.plaintext = tls is None
        self._tls_hint = _tls_hint(tls)
        channel_target = connection.channel_target(self.target)
        options = connection.channel_options(separate=self.connections > 1)
        if oidc_token is not None:
            check_token(oidc_token, "the OIDC token")
        credentials: grpc.ChannelCredentials | None = None
        if tls is not None:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            credentials = tls.credentials()
            if oidc_token is not None:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.access_token_call_credentials(oidc_token)
                )
        elif oidc_token is not None and not plaintext.is_local(self.target):
            raise UsageError(
                f"refusing to send the OIDC token over plaintext to {self.target}, which "
                "is not this machine (even with --insecure): use TLS (--tls-ca)"
            )

        def open_channel() -> grpc.Channel:
            if credentials is not None:
                return grpc.secure_channel(channel_target, credentials, options=options)
            channel = grpc.insecure_channel(channel_target, options=options)
            if oidc_token is not None:
                channel = grpc.intercept_channel(channel, _BearerInterceptor(oidc_token))
            return channel

        self._channels = [open_channel() for _ in range(self.connections)]
        self._signers = [pb_grpc.SignerStub(c) for c in self._channels]
        self._turn = itertools.count()
        self.admin = pb_grpc.KeyAdminStub(self._channels[0])

    @property
    def signer(self) -> pb_grpc.SignerStub:
        """The Signer stub for the next call: each use takes the next channel in turn."""
        # next() on itertools.count is one C call: threads never get the same number.
        return self._signers[next(self._turn) % len(self._signers)]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, fn: Callable[[], T]) -> T:
        """Runs a raw stub call, turning gRPC errors into RemoteError."""
        return _call(fn, self._tls_hint)

    def public_key(self, key: str | pb.KeyRef) -> PublicKey:
        ref = key_ref(key)
        r = self.call(
            lambda: self.signer.GetPublicKey(pb.GetPublicKeyRequest(key=ref), timeout=self.timeout)
        )
        return PublicKey(KeyInfo.from_pb(r.key), r.spki_der, r.spki_pem, r.pkcs1_pem)

    def sign_digest(
        self,
        key: str | pb.KeyRef,
        digest: bytes,
        algorithm: str = names.DEFAULT_SIGNATURE_ALGORITHM,
    ) -> Signature:
        ref = key_ref(key)
        req = pb.SignDigestRequest(key=ref, algorithm=_algorithm(algorithm), digest=digest)
        r = self.call(lambda: self.signer.SignDigest(req, timeout=self.timeout))
        return Signature(KeyInfo.from_pb(r.key), r.signature)

    def sign_digests(
        self,
        key: str | pb.KeyRef,
        digests: Sequence[bytes],
        algorithm: str = names.DEFAULT_SIGNATURE_ALGORITHM,
    ) -> tuple[KeyInfo, list[bytes]]:
        ref = key_ref(key)
        req = pb.SignDigestsRequest(key=ref, algorithm=_algorithm(algorithm), digests=digests)
        r = self.call(lambda: self.signer.SignDigests(req, timeout=self.timeout))
        return KeyInfo.from_pb(r.key), list(r.signatures)


def _algorithm(name: str) -> pb.SignatureAlgorithm.ValueType:
    return choose(names.SIGNATURE_ALGORITHMS, name, "algorithm").pb


# -- Capgo calls -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SealedBundle:
    """The daemon's answer for one bundle: the two upload fields and the key that made them."""

    key: KeyInfo
    iv_session_key: str
    signed_checksum: str


def _checksum_format(name: str) -> pb.ChecksumFormat.ValueType:
    return choose(names.CHECKSUM_FORMATS, name, "checksum format").pb


def seal_bundle(
    client: Client,
    key: str | pb.KeyRef,
    session_key: bytes,
    iv: bytes,
    checksum_sha256: bytes,
    checksum_format: str = names.DEFAULT_CHECKSUM_FORMAT,
) -> SealedBundle:
    """SealBundle: the sealed session key (as ivSessionKey) and the signed checksum."""
    ref = key_ref(key)
    req = pb.SealBundleRequest(
        key=ref,
        session_key=session_key,
        iv=iv,
        checksum_sha256=checksum_sha256,
        format=_checksum_format(checksum_format),
    )
    r = client.call(lambda: client.signer.SealBundle(req, timeout=client.timeout))
    return SealedBundle(KeyInfo.from_pb(r.key), r.iv_session_key, r.signed_checksum)


def seal_session_key(client: Client, key: str | pb.KeyRef, session_key: bytes) -> Signature:
    ref = key_ref(key)
    req = pb.SealSessionKeyRequest(key=ref, session_key=session_key)
    r = client.call(lambda: client.signer.SealSessionKey(req, timeout=client.timeout))
    return Signature(KeyInfo.from_pb(r.key), r.sealed_session_key)


def sign_checksums(
    client: Client,
    key: str | pb.KeyRef,
    checksums_sha256: Sequence[bytes],
    checksum_format: str = names.DEFAULT_CHECKSUM_FORMAT,
    batch_size: int = 1000,
) -> tuple[KeyInfo, list[str]]:
    """SignChecksums in batches of ``batch_size``; all with the same key version.

    Raises RemoteError if the daemon answers with different versions across batches (the key
    was rotated mid-release), so that one release never mixes key versions.
    """
    ref = key_ref(key)
    out: list[str] = []
    info: KeyInfo | None = None
    for start in range(0, len(checksums_sha256), batch_size):
        chunk = checksums_sha256[start : start + batch_size]
        req = pb.SignChecksumsRequest(
            key=ref, checksums_sha256=chunk, format=_checksum_format(checksum_format)
        )
        r = client.call(functools.partial(client.signer.SignChecksums, req, timeout=client.timeout))
        this = KeyInfo.from_pb(r.key)
        if info is None:
            info = this
            # pin the version for the remaining batches
            ref = pb.KeyRef(name=this.name, version=this.version)
        elif this.fingerprint != info.fingerprint:
            raise RemoteError("ABORTED", "the key changed between batches; run again")
        out.extend(r.signed_checksums)
    if info is None:
        raise UsageError("no checksums to sign")
    return info, out
