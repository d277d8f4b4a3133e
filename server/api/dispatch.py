"""From the wire to a serving thread: the event loop reads every call, the threads run only
complete ones (docs/adr/0008-serving-model.md).

The gRPC server is ``grpc.aio`` (``server.loopserver``). Its event loop receives each call's
request; a stream that sends headers and then nothing holds a coroutine, never one of the
``server.threads`` serving threads (DESIGN fact 11), and is ended with DEADLINE_EXCEEDED once
``max_request_receive_seconds`` pass without its request (a ``NotReceived`` for the
pipeline, which refuses it at once on a serving thread). A complete request goes to the
serving threads, where the servicers and the call pipeline (``server.api.pipeline``) run
unchanged, synchronous, on a ``PoolContext``.

On its way there a request gets, from ``Dispatch``, what the sync server's interceptors did:
a body that does not parse becomes ``MALFORMED`` (INVALID_ARGUMENT), one over its method's
size bound an ``Oversized``, and one that the process's byte budget (``InFlightBytes``)
cannot take now an ``OverBudget`` (both RESOURCE_EXHAUSTED from the ``well_formed`` stage,
logged and audited like any call); every answer carries the ``ANSWERED_BY`` mark.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Awaitable, Callable
from concurrent import futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
from google.protobuf.message import DecodeError, Message

from hsmsign.names import ANSWERED_BY
from server.api import deadlines
from server.api.limits import LARGE_REQUEST_METHODS, NotReceived, Oversized
from server.api.malformed import MALFORMED
from server.limitsconfig import ConnectionLimits

if TYPE_CHECKING:  # generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler

#: How long a call whose request stream ended without a message waits for grpc.aio to cancel
#: it (a cut call) before it is refused as malformed.
EOF_SETTLE_SECONDS = 0.05

#: A servicer method as grpc's generated code registers it: (request, context) -> response.
Behaviour = Callable[[Any, grpc.ServicerContext], Any]


@dataclass(frozen=True, slots=True)
class OverBudget(Oversized):
    """What the pipeline gets instead of a request the byte budget cannot take now: refused
    with RESOURCE_EXHAUSTED by the ``well_formed`` stage, like an ``Oversized``."""

    def message(self, method: str) -> str:
        return (
            f"hsmsignd is busy: the requests in flight in this process take all of its "
            f"{self.limit:,}-byte budget, and this one is {self.size:,} bytes; retry"
        )


class InFlightBytes:
    """The bytes of requests this process holds at once (``max_bytes_in_flight``): taken when
    a request has arrived, given back when its serving thread has finished with it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.held = 0

    def take(self, size: int) -> bool:
        """True if ``size`` bytes were taken; False (nothing taken) if they do not fit now."""
        with self._lock:
            if self.held + size > self.limit:
                return False
            self.held += size
            return True

    def give_back(self, size: int) -> None:
        with self._lock:
            self.held -= size


class Aborted(Exception):
    """Raised in a serving thread by ``PoolContext.abort``; the event loop then ends the
    call with this status (the sync server's abort raised in the same way)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class PoolContext(grpc.ServicerContext):
    """The call's context as the synchronous servicers and pipeline see it, in a serving
    thread. ``abort`` raises ``Aborted`` for the event loop to send; ``is_active`` turns
    False when the loop sees the caller cancel or its deadline pass.

    The peer and its TLS properties are read here, on the event loop, before the call goes
    to a serving thread: grpc.aio releases the call's core object as soon as the call ends,
    and a serving thread still finishing a cancelled batch that asked for them then would
    read freed memory (seen: the daemon died of SIGSEGV). Everything else read from grpc.aio's
    context (metadata, deadline, status) is kept by its Python object."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context
        self._peer = context.peer()
        self._auth_context = context.auth_context()
        self._gone = False
        self._callbacks: list[Callable[[], None]] = []

    def caller_gone(self) -> None:
        """Called on the event loop when grpc.aio cancels the call."""
        self._gone = True

    def is_active(self) -> bool:
        return not self._gone and not self._context.done()

    # None without a deadline, as grpc's own contexts answer (its stubs say float).
    def time_remaining(self) -> float | None:  # type: ignore[override]
        return self._context.time_remaining()

    def cancel(self) -> NoReturn:
        raise Aborted(grpc.StatusCode.CANCELLED, "cancelled by the server")

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._callbacks.append(callback)
        return True

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> NoReturn:
        raise NotImplementedError("hsmsign reads the peer's certificate from auth_context()")

    def peer_identity_key(self) -> NoReturn:
        raise NotImplementedError("hsmsign reads the peer's certificate from auth_context()")

    def auth_context(self) -> Any:
        return self._auth_context

    def set_compression(self, compression: grpc.Compression) -> None:
        self._context.set_compression(compression)

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        raise NotImplementedError("hsmsign's calls send no initial metadata of their own")

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def trailing_metadata(self) -> Any:
        return self._context.trailing_metadata()

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)

    def abort_with_status(self, status: grpc.Status) -> NoReturn:
        raise Aborted(status.code, status.details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._context.set_code(code)

    def set_details(self, details: str) -> None:
        self._context.set_details(details)

    def code(self) -> grpc.StatusCode | None:
        return self._context.code()

    def details(self) -> str | None:
        return self._context.details()

    def disable_next_message_compression(self) -> None:
        self._context.disable_next_message_compression()

    def finished(self) -> None:
        """Runs the callbacks added with ``add_callback`` (the call has ended)."""
        for callback in self._callbacks:
            callback()


def lenient(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A request deserializer that hands over ``MALFORMED`` for a body that does not parse
    (grpc would answer INTERNAL and log a traceback)."""

    def parse_or_malformed(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError):
            return MALFORMED

    return parse_or_malformed


class Dispatch(grpc.aio.ServerInterceptor):
    """Replaces each hsmsign unary method's handler (once, cached by method) with one that
    receives the request on the event loop and runs the servicer method on ``pool``."""

    def __init__(self, limits: ConnectionLimits, pool: futures.ThreadPoolExecutor) -> None:
        self._small = limits.max_small_request_bytes
        self._receive_seconds = limits.max_request_receive_seconds
        self._pool = pool
        self.budget = InFlightBytes(limits.max_bytes_in_flight)
        self._handlers: dict[str, Handler | None] = {}
        #: Set while the server stops: calls wait on it until gRPC's shutdown has begun.
        self._parked: asyncio.Event | None = None

    def park(self) -> None:
        """From now on (the server is about to stop) calls wait for ``release``, on the event
        loop, before they are answered. A call gRPC holds but has not handed to a handler
        when its shutdown begins is answered CANCELLED (grpc/grpc#41785); a call that waits
        here has been handed over, so it is answered (UNAVAILABLE: the pipeline is draining),
        and the next one, sent after gRPC's GOAWAY, is refused UNAVAILABLE by the client's
        own transport. Call on the event loop."""
        if self._parked is None:
            self._parked = asyncio.Event()

    def release(self) -> None:
        """Lets the parked calls go on (gRPC's shutdown has begun). Call on the event loop."""
        if self._parked is not None:
            self._parked.set()

    async def _wait_if_parked(self) -> None:
        if self._parked is not None:
            await self._parked.wait()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        if self._parked is not None and not method.startswith("/hsmsign."):
            return self._parked_handler(await continuation(handler_call_details))
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(handler_call_details)
        # Only hsmsign's own methods run in the pipeline; health and reflection are async.
        if (
            method.startswith("/hsmsign.")
            and handler is not None
            and handler.unary_unary is not None
            and handler.request_deserializer is not None
        ):
            handler = self._dispatched(
                method,
                handler.unary_unary,
                handler.request_deserializer,
                handler.response_serializer,
            )
        self._handlers[method] = handler
        return handler

    def _parked_handler(self, handler: Handler | None) -> Handler | None:
        """A unary handler of another service (health, reflection) that waits while parked."""
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour: Callable[..., Any] = handler.unary_unary

        async def wait_then_run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._wait_if_parked()
            answer = behaviour(request, context)
            return await answer if inspect.isawaitable(answer) else answer

        return grpc.unary_unary_rpc_method_handler(
            wait_then_run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _dispatched(
        self,
        method: str,
        behaviour: Behaviour,
        parse: Callable[[bytes], Any],
        serialize: Callable[[Any], bytes] | None,
    ) -> Handler:
        limit = None if method in LARGE_REQUEST_METHODS else self._small
        name = method.rsplit("/", 1)[1]

        # Registered as stream-unary (the same bytes on the wire as unary-unary) so that the
        # request is read here, with a bound on how long it may take to arrive.
        async def receive_then_run(
            _requests: object, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            context.set_trailing_metadata((ANSWERED_BY,))
            if self._parked is not None:  # the server is stopping (park)
                await self._parked.wait()
            try:
                request = await self._receive(context)
            except asyncio.CancelledError:
                # The caller's deadline passed (or it cancelled) before its request was read:
                # counted, not recorded (a flood of doomed calls would otherwise cost a
                # pipeline run and an audit record each).
                deadlines.tally.gone_unread(name)
                raise
            return await self._run(behaviour, request, context, limit)

        return grpc.stream_unary_rpc_method_handler(
            receive_then_run, request_deserializer=lenient(parse), response_serializer=serialize
        )

    async def _receive(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The call's request; ``NotReceived`` if it did not arrive in time, ``MALFORMED`` if
        the stream ended without one. Raises CancelledError when gRPC ends the call (its
        caller went) meanwhile."""
        try:
            async with asyncio.timeout(self._receive_seconds):  # no task per call
                request = await context.read()
        except TimeoutError:
            # Refused in the pipeline, logged and audited like any call.
            return NotReceived(self._receive_seconds)
        if request is grpc.aio.EOF:
            # No message: the call was cut (a client that went away, its deadline passed, a
            # load generator stopping), or a client half-closed without one. grpc.aio cancels
            # this task for the first as soon as it has seen the cut; give it that moment, so
            # that a cut call is not logged as INVALID_ARGUMENT (the sync server never ran one).
            await asyncio.sleep(EOF_SETTLE_SECONDS)
            return MALFORMED
        return request

    async def _run(
        self,
        behaviour: Behaviour,
        request: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        limit: int | None,
    ) -> Any:
        taken = 0
        if isinstance(request, Message):
            size = request.ByteSize()
            if limit is not None and size > limit:
                request = Oversized(size, limit)
            elif size > self._small:
                # Small requests are not counted: their number is bounded by the concurrent
                # call limit, and counting each would cost every call a lock.
                if self.budget.take(size):
                    taken = size
                else:
                    request = OverBudget(size, self.budget.limit)
        pool_context = PoolContext(context)
        job = self._pool.submit(behaviour, request, pool_context)
        if taken:
            job.add_done_callback(lambda _job: self.budget.give_back(taken))
        try:
            response = await asyncio.wrap_future(job)
        except asyncio.CancelledError:
            pool_context.caller_gone()  # the serving thread's deadline stage sees it
            raise
        except Aborted as aborted:
            await context.abort(aborted.code, aborted.details)
        finally:
            pool_context.finished()
        return response
