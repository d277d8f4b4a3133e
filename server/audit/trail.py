"""What the daemon records: one audit record per call (``begin`` ... ``commit``/``refused``,
called by the call pipeline's ``audit`` stage, ``server.api.pipeline``) and per action the
daemon takes by itself (``event``).

A call's record names the caller (``identity``: ``server.identity.current_identity()`` once
the call has passed the pipeline, or ``unauthenticated``), the peer, the operation, the key
reference it asked for and the key versions it used, the SHA-256 of every bytes field of the
request (never the bytes: digests, session keys and wrapped keys are inputs the trail must
not hold), the outcome and status, the request id (the caller's ``x-request-id`` metadata, or
one made here; returned in the ``x-request-id`` trailing metadata either way) and how long it
took. With no ``[audit] path`` configured every function here does nothing.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from hsmsign import auditlog
from server.audit.config import AuditConfig
from server.audit.writer import AuditUnavailable, ChainWriter
from server.errors import ServerError
from server.identity import Identity, current_identity

log = logging.getLogger("hsmsign.audit")

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

#: Status codes that mean "refused" (the caller's request, or policy) rather than a fault.
_REFUSALS = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "FAILED_PRECONDITION",
        "RESOURCE_EXHAUSTED",
        "UNAUTHENTICATED",
        "OUT_OF_RANGE",
        "ALREADY_EXISTS",
    }
)

#: KeyAdmin calls that make a key version: their record names the version made.
_MAKES_A_VERSION = frozenset({"CreateKey", "RotateKey", "ImportKey"})

_writer: ChainWriter | None = None
_current: contextvars.ContextVar[CallRecord | None] = contextvars.ContextVar(
    "audit_call", default=None
)


def start(
    config: AuditConfig,
    chain: str,
    checkpointer_factory: Callable[[], Any] | None,
    on_health: Callable[[bool], None],
) -> ChainWriter | None:
    """Opens this process's chain (``chain``: the serving process's number). Raises
    StartupError when another process holds that chain or the audit key is unusable."""
    global _writer
    if not config.enabled:
        return None
    checkpointer = checkpointer_factory() if checkpointer_factory else None
    instance = f"{socket.gethostname()}/{chain}/{os.getpid()}"
    writer = ChainWriter(config, chain, instance, checkpointer, on_health)
    writer.start()
    _writer = writer
    return writer


def stop() -> None:
    """Signs a last checkpoint and closes the chain."""
    global _writer
    writer, _writer = _writer, None
    if writer is not None:
        writer.stop()


def identity_fields(identity: Identity | None) -> dict[str, Any]:
    """How a record names a caller: the identity's kind (mtls, oidc, local), name, subject,
    issuer and claims; ``{"kind": "unauthenticated"}`` for a call whose caller was not
    identified (refused before or by identification)."""
    if identity is None:
        return {"kind": "unauthenticated"}
    out: dict[str, Any] = {
        "kind": identity.kind,
        "name": identity.name,
        "subject": identity.subject,
    }
    if identity.issuer is not None:
        out["issuer"] = identity.issuer
    if identity.claims:
        out["claims"] = dict(identity.claims)
    return out


def _request_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID.match(value):
            return value
    return uuid.uuid4().hex


def outcome_of(status: str) -> str:
    """A record's ``outcome`` for a gRPC status name: ok, refused (the request or the policy)
    or error (a fault)."""
    return "ok" if status == "OK" else "refused" if status in _REFUSALS else "error"


def summarize(request: Message) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(key reference, input digests, other parameters) of a request message: every bytes
    field becomes its SHA-256, string and number fields are kept, nothing else."""
    ref: dict[str, Any] = {}
    inputs: dict[str, Any] = {}
    params: dict[str, Any] = {}
    if not isinstance(request, Message):
        return ref, inputs, params  # a body that did not parse (server.api.malformed)
    for fd, value in request.ListFields():
        repeated = fd.is_repeated
        if fd.type == FieldDescriptor.TYPE_BYTES:
            inputs[fd.name] = (
                [auditlog.input_digest(v) for v in value]
                if repeated
                else auditlog.input_digest(value)
            )
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if fd.message_type is not None and fd.message_type.name == "KeyRef":
                for sub, sub_value in value.ListFields():
                    ref[{"name": "key"}.get(sub.name, sub.name)] = sub_value
            # Other messages (a destruction delay): not needed to answer who used which key.
        elif fd.name == "name" and not repeated:
            ref["key"] = value
        elif fd.name == "version" and not repeated:
            ref["version"] = value
        elif not repeated:
            params[fd.name] = value
    return ref, inputs, params


class CallRecord:
    """The record of one call, written when the call ends."""

    __slots__ = (
        "context",
        "done",
        "keys",
        "method",
        "request",
        "request_id",
        "started",
    )

    def __init__(self, method: str, request: Message, context: grpc.ServicerContext) -> None:
        self.method, self.request, self.context = method, request, context
        self.request_id = _request_id(context)
        self.started = time.perf_counter()
        self.keys: list[tuple[str, int, str]] = []
        self.done = False

    def _answer_request_id(self) -> None:
        # Added to what the call set already (the limiter's retry-after-ms): setting
        # trailing metadata replaces it.
        before = tuple(self.context.trailing_metadata() or ())
        self.context.set_trailing_metadata((*before, (REQUEST_ID_HEADER, self.request_id)))

    def _fields(self, status: str, message: str | None) -> dict[str, Any]:
        ref, inputs, params = summarize(self.request)
        outcome = outcome_of(status)
        if status == "OK" and not self.context.is_active():
            outcome = "abandoned"  # computed, but the caller had gone (deadline, cancel)
        fields: dict[str, Any] = {
            "kind": "call",
            "time": auditlog.utc_now(),
            "op": self.method,
            "identity": identity_fields(current_identity()),
            "peer": self.context.peer(),
            "request_id": self.request_id,
            "outcome": outcome,
            "status": status,
            "inputs": inputs,
            "ms": round((time.perf_counter() - self.started) * 1000, 3),
        }
        if params:
            fields["params"] = params
        if ref:
            fields["ref"] = ref
        used = list(dict.fromkeys(self.keys))
        if used:
            fields["key"], fields["version"], fields["fingerprint"] = used[0]
            if len(used) > 1:
                fields["also_used"] = [
                    {"key": n, "version": v, "fingerprint": f} for n, v, f in used[1:]
                ]
        elif "key" in ref:
            fields["key"] = ref["key"]
            if "version" in ref:
                fields["version"] = ref["version"]
        if message:
            fields["message"] = message
        return fields

    def commit(self, result: object = None) -> None:
        """Writes the record of a call that succeeded. Raises AuditUnavailable: the result
        must then be withheld."""
        self.done = True
        self._answer_request_id()
        versions = getattr(result, "versions", None)
        if self.method in _MAKES_A_VERSION and versions:
            made = max(versions, key=lambda v: v.version)
            self.keys.append((getattr(result, "name", ""), made.version, made.fingerprint))
        writer = _writer
        if writer is not None:
            writer.append(self._fields("OK", None))

    def refused(self, error: ServerError) -> ServerError:
        """Writes the record of a call that failed with ``error``; returns the error to
        answer with: ``error``, or AuditUnavailable when its record could not be written."""
        if self.done:
            return error
        self.done = True
        self._answer_request_id()
        writer = _writer
        if writer is None:
            return error
        try:
            writer.append(self._fields(error.code.name, str(error)))
        except AuditUnavailable as e:
            return e
        return error


class _Unaudited:
    """The record of a call when no trail is configured: does nothing."""

    __slots__ = ()

    def commit(self, result: object = None) -> None:
        pass

    def refused(self, error: ServerError) -> ServerError:
        return error


_UNAUDITED = _Unaudited()


def begin(method: str, request: Message, context: grpc.ServicerContext) -> CallRecord | _Unaudited:
    """Starts the record of a call (its request id goes into the response's trailing
    metadata when the record is written)."""
    if _writer is None:
        return _UNAUDITED
    record = CallRecord(method, request, context)
    _current.set(record)
    return record


def note_key(name: str, version: int, fingerprint: str) -> None:
    """Records that the current call used this key version."""
    record = _current.get()
    if record is not None and _writer is not None:
        record.keys.append((name, version, fingerprint))


def event(op: str, **fields: Any) -> None:
    """Records an action the daemon took by itself (a scheduled destruction). The action has
    happened: a record that cannot be written is logged, and the trail turns unhealthy."""
    writer = _writer
    if writer is not None:
        try:
            writer.append_event(op, **fields)
        except AuditUnavailable:
            log.error("audit record of %s lost: the trail cannot be written", op)
