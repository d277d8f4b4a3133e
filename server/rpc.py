"""The RPC plumbing shared by every servicer: the one place where domain errors become gRPC
status codes, and the conversions between API messages and domain values.

The ``rpc`` decorator maps every ``ServerError`` to its status with its one-line message, and
anything unexpected to INTERNAL with an incident id (the traceback stays in the daemon's log).
Nothing the caller sent (digests, session keys) is logged; calls are logged by method, peer
and status.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from server import operations
from server.accesslog import access
from server.audit import trail as audit
from server.errors import InvalidArgument, KeyObjectGone, ServerError
from server.keyring import KeyReference, KeyVersion

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.ServicerContext], Resp]

_ALGORITHMS: dict[int, str] = {
    pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256: "rsa-pkcs1-sha256",
    pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA384: "rsa-pkcs1-sha384",
    pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA512: "rsa-pkcs1-sha512",
    pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA256: "rsa-pss-sha256",
    pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA384: "rsa-pss-sha384",
    pb.SIGNATURE_ALGORITHM_RSA_PSS_SHA512: "rsa-pss-sha512",
}


class _Calls:
    """Calls in flight in this process, and whether it is draining (SIGTERM received)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.in_flight = 0
        self.draining = False

    def drain(self, timeout: float) -> bool:
        """Refuses new calls from now on; waits up to ``timeout`` seconds for the ones in
        flight to return. True when none is left."""
        with self.cond:
            self.draining = True
            return self.cond.wait_for(lambda: self.in_flight == 0, timeout)


#: This process's calls (server.main drains them on SIGTERM).
calls = _Calls()

#: The key versions a call used, for its access-log line (set by ``used_key``).
_keys_used: contextvars.ContextVar[list[str]] = contextvars.ContextVar("keys_used")


def rpc(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Maps errors to status codes and writes one access-log line per call."""

    @functools.wraps(handler)
    def wrapper(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        with calls.cond:
            if calls.draining:
                refused = True
            else:
                refused = False
                calls.in_flight += 1
        if refused:
            context.abort(grpc.StatusCode.UNAVAILABLE, "hsmsignd is shutting down; retry")
        try:
            return _run(self, request, context)
        finally:
            with calls.cond:
                calls.in_flight -= 1
                if calls.in_flight == 0:
                    calls.cond.notify_all()

    def _run(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        start = time.perf_counter()
        status = "OK"
        used: list[str] = []
        _keys_used.set(used)
        record = audit.begin(handler.__name__, request, context)  # type: ignore[arg-type]
        try:
            try:
                result = handler(self, request, context)
            except KeyObjectGone:
                # Another process destroyed the version between this process's last read of
                # the ring and the token call: re-read and answer as the ring now says (the
                # version shows as destroyed). Signer calls have no side effects, so running
                # the call again is safe; KeyAdmin calls are not retried.
                ring = getattr(self, "retry_ring", None)
                if ring is None:
                    raise
                ring.refresh()
                used.clear()
                result = handler(self, request, context)
            record.commit(result)  # fail-closed: AuditUnavailable withholds the result
            return result
        except ServerError as e:
            answer = record.refused(e)
            status = answer.code.name
            context.abort(answer.code, str(answer))
        except Exception:
            incident = uuid.uuid4().hex[:12]
            log.exception("internal error in %s (incident %s)", handler.__name__, incident)
            answer = record.refused(ServerError(f"internal error (incident {incident})"))
            status = answer.code.name
            context.abort(answer.code, str(answer))
        finally:
            access.line(
                handler.__name__,
                context.peer(),
                status,
                ",".join(used) or "-",
                (time.perf_counter() - start) * 1000,
            )

    return wrapper


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
    """The UsedKey of a response; also records the version for the call's access-log line."""
    used = _keys_used.get(None)
    if used is not None:
        used.append(f"{v.name}@{v.version}")
        audit.note_key(v.name, v.version, v.fingerprint)
    return pb.UsedKey(
        name=v.name,
        version=v.version,
        fingerprint=v.fingerprint,
        capgo_key_id=v.capgo_key_id,
        modulus_bits=v.bits,
    )


def scheme_for(algorithm: int) -> operations.SignatureScheme:
    name = _ALGORITHMS.get(algorithm)
    if name is None:
        allowed = ", ".join(pb.SignatureAlgorithm.Name(a) for a in _ALGORITHMS)  # type: ignore[arg-type]
        raise InvalidArgument(f"algorithm {algorithm} is not supported; allowed: {allowed}")
    return operations.SCHEMES[name]
