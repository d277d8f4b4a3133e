"""The call pipeline: every RPC handler runs inside the same named stages.

A call passes the stages in ``STAGES`` from the outside in, then the handler, and comes back
out through them in reverse. Today's stages:

``access_log``
    one access-log line per call (method, peer, status, key versions used, duration);
    never what the caller sent. The same call is counted in the metrics (``server.metrics``).
``status``
    the one place where errors become gRPC status codes: a ``ServerError`` ends the call with
    its ``code`` and its one-line message; anything else with INTERNAL and an incident id
    (the traceback stays in the daemon's log).
``audit``
    the call's durable audit record (``server.audit.trail``; nothing without ``[audit]``),
    written when the call comes back: who called (``server.identity.current_identity()``),
    the key versions used, digests of the inputs, the status. It sits outside every stage
    that can refuse a call, so a call refused as malformed, by the policy, by a limit or
    while draining is on the trail too. A record that cannot be written fails the call with
    UNAVAILABLE (``AuditUnavailable``): a result is never returned unaudited.
``well_formed``
    refuses a request body that is not the method's message (``server.api.malformed``)
    with INVALID_ARGUMENT, one over its method's size bound or the process's byte budget
    (``server.api.limits``, ``server.api.dispatch``) with RESOURCE_EXHAUSTED, and a call
    whose request did not arrive in time with DEADLINE_EXCEEDED.
``access``
    who the caller is (``server.identity``: its TLS certificate by a typed rule, its OIDC
    token, or the local dev identity), its per-identity limits, and whether the policy
    (``server.policy``) grants it the call's operation on every key the request names;
    default deny.
``deadline``
    refuses a call whose caller has gone (its deadline passed, or it cancelled) before any
    token work, and lets the signing loops stop a batch between chunks once it goes
    (``server.api.deadlines``): DEADLINE_EXCEEDED or CANCELLED. After ``access``, so that a
    policy or rate-limit refusal is what such a caller would have been told.
``admission``
    refuses calls once the process is draining (SIGTERM) and counts the calls in flight, so
    that draining can wait for them; then gives the call a place and its turns at the token
    in fair order across identities, or refuses it with RESOURCE_EXHAUSTED when there is no
    room (``server.api.admission``). Inside ``access`` (it needs the identity) and
    ``deadline`` (a call whose caller goes while it waits leaves the queue unrun).
``handler``
    runs the servicer's method; a Signer call whose key object another process destroyed
    meanwhile is answered again after a re-read of the ring (``retry_ring``).

A stage is a function ``(call, proceed) -> response`` that may read and annotate the
``Call``: add it to ``STAGES`` with its name. Raise a ``ServerError`` to refuse a call; never
abort it directly (``status`` is the one place that does).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import grpc

from server import metrics
from server.api import admission, deadlines
from server.api.accesslog import access
from server.api.limits import NotReceived, Oversized
from server.api.malformed import MALFORMED
from server.audit import trail as audit
from server.errors import (
    Busy,
    DeadlineExceeded,
    InvalidArgument,
    KeyObjectGone,
    ServerError,
    Unavailable,
)
from server.identity.model import current_identity, set_current_identity
from server.policy import gate

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.ServicerContext], Resp]


@dataclass(slots=True)
class Call:
    """One call as it passes the stages."""

    method: str
    servicer: Any
    request: Any
    context: grpc.ServicerContext
    #: The status the call ended with, by name (set by the ``status`` stage).
    status: str = "OK"
    #: Key versions the call used ("name@version"), for its log line and audit record.
    keys_used: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    #: The incident id of a call that failed unexpectedly (its log line and audit record).
    incident: str | None = None

    def new_incident(self) -> str:
        """The call's incident id, made on first use."""
        if self.incident is None:
            self.incident = uuid.uuid4().hex[:12]
        return self.incident


#: What a stage calls to run the rest of the pipeline.
Proceed = Callable[[Call], Any]
#: One stage: does its part before and after ``proceed(call)``.
Stage = Callable[[Call, Proceed], Any]


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


#: This process's calls (``server.serve`` drains them on SIGTERM).
calls = _Calls()

#: The call running in this thread (``note_key_used`` records into it).
_current: contextvars.ContextVar[Call] = contextvars.ContextVar("call")


def note_key_used(name: str, version: int, fingerprint: str) -> None:
    """Records that the running call used a key version (``server.api.convert.used_key``),
    for its access-log line and its audit record."""
    call = _current.get(None)
    if call is not None:
        call.keys_used.append(f"{name}@{version}")
        audit.note_key(name, version, fingerprint)


# -- the stages -------------------------------------------------------------------------------


def access_log_stage(call: Call, proceed: Proceed) -> Any:
    try:
        return proceed(call)
    finally:
        seconds = time.perf_counter() - call.started
        access.line(
            call.method,
            call.context.peer(),
            call.status,
            ",".join(call.keys_used) or "-",
            seconds * 1000,
        )
        metrics.call(call.method, call.status, seconds)


def status_stage(call: Call, proceed: Proceed) -> Any:
    try:
        return proceed(call)
    except ServerError as e:
        call.status = e.code.name
        call.context.abort(e.code, str(e))
    except Exception:
        incident = call.new_incident()
        call.status = "INTERNAL"
        log.exception("internal error in %s (incident %s)", call.method, incident)
        call.context.abort(grpc.StatusCode.INTERNAL, f"internal error (incident {incident})")


def audit_stage(call: Call, proceed: Proceed) -> Any:
    record = audit.begin(call.method, call.request, call.context)
    try:
        result = proceed(call)
    except ServerError as e:
        answer = record.refused(e)  # AuditUnavailable when the record cannot be written
        if answer is e:
            raise
        raise answer from None
    except Exception:
        # Recorded with the incident id only: the details stay in the daemon's log, which
        # the status stage writes under the same id.
        answer = record.refused(ServerError(f"internal error (incident {call.new_incident()})"))
        if isinstance(answer, Unavailable):
            log.exception("internal error in %s (incident %s)", call.method, call.incident)
            raise answer from None
        raise
    record.commit(result)  # AuditUnavailable: the result is withheld
    return result


def well_formed_stage(call: Call, proceed: Proceed) -> Any:
    if call.request is MALFORMED:
        raise InvalidArgument(f"the request is not a valid {call.method} request message")
    if isinstance(call.request, Oversized):
        raise Busy(call.request.message(call.method))
    if isinstance(call.request, NotReceived):
        raise DeadlineExceeded(call.request.message())
    return proceed(call)


def access_stage(call: Call, proceed: Proceed) -> Any:
    with gate.admit(call.servicer, call.method, call.request, call.context):
        return proceed(call)


def deadline_stage(call: Call, proceed: Proceed) -> Any:
    return deadlines.run(call.context, lambda: proceed(call))


def admission_stage(call: Call, proceed: Proceed) -> Any:
    with calls.cond:
        refused = calls.draining
        if not refused:
            calls.in_flight += 1
    if refused:
        raise Unavailable("hsmsignd is shutting down; retry")
    try:
        with admission.admitted(
            call.method,
            current_identity(),
            deadlines.batch_check(),
            call.context.time_remaining(),
        ):
            return proceed(call)
    finally:
        with calls.cond:
            calls.in_flight -= 1
            if calls.in_flight == 0:
                calls.cond.notify_all()


#: The stages, outermost first (see the module docstring for where new ones go).
STAGES: Final[tuple[tuple[str, Stage], ...]] = (
    ("access_log", access_log_stage),
    ("status", status_stage),
    ("audit", audit_stage),
    ("well_formed", well_formed_stage),
    ("access", access_stage),
    ("deadline", deadline_stage),
    ("admission", admission_stage),
)


def _handler_stage(handler: Handler[Any, Any]) -> Proceed:
    def run(call: Call) -> Any:
        try:
            return handler(call.servicer, call.request, call.context)
        except KeyObjectGone:
            # Another process destroyed the version between this process's last read of the
            # ring and the token call: re-read and answer as the ring now says (the version
            # shows as destroyed). Signer calls have no side effects, so running the call
            # again is safe; KeyAdmin calls (no retry_ring) are not retried.
            ring = getattr(call.servicer, "retry_ring", None)
            if ring is None:
                raise
            ring.refresh()
            call.keys_used.clear()
            return handler(call.servicer, call.request, call.context)

    return run


def _bind(stage: Stage, proceed: Proceed) -> Proceed:
    return lambda call: stage(call, proceed)


def _compose(stages: tuple[tuple[str, Stage], ...], innermost: Proceed) -> Proceed:
    run = innermost
    for _name, stage in reversed(stages):
        run = _bind(stage, run)
    return run


def rpc(handler: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Runs a servicer method inside the pipeline's stages."""
    run = _compose(STAGES, _handler_stage(handler))
    method = handler.__name__

    @functools.wraps(handler)
    def wrapper(self: Any, request: Req, context: grpc.ServicerContext) -> Resp:
        call = Call(method, self, request, context)
        token = _current.set(call)
        set_current_identity(None)  # until the access stage identifies this call's caller
        try:
            result: Resp = run(call)
            return result
        finally:
            _current.reset(token)

    return wrapper
