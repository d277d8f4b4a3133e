"""What one client connection may cost a serving process: the gRPC server options for
message size, keepalive and connection lifetimes, and the per-method request size bound.
Every unary answer also carries a mark saying hsmsignd sent it (``ANSWERED_BY``).

gRPC Python has one receive limit per server, so the transport's bound is the largest any
call needs (the batch calls) and ``CallGate`` hands the call pipeline an ``Oversized`` in
place of a larger request on the other calls; its ``well_formed`` stage answers
RESOURCE_EXHAUSTED before the handler runs. The values come from [server.limits]
(``server.config.ConnectionLimits``); docs/operations.md explains them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
from google.protobuf.message import Message

from hsmsign.names import ANSWERED_BY
from server.config import ConnectionLimits

#: Calls whose request may be as large as ``max_request_bytes``: up to 10,000 digests or
#: checksums, or a private key to import. Every other unary call carries one digest, key or
#: ciphertext and is bounded by ``max_small_request_bytes``.
LARGE_REQUEST_METHODS: Final = frozenset(
    {
        "/hsmsign.v1.Signer/SignDigests",
        "/hsmsign.v1.Signer/SignChecksums",
        "/hsmsign.v1.KeyAdmin/ImportKey",
    }
)


if TYPE_CHECKING:  # generic only in the type stubs
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def server_options(limits: ConnectionLimits, reuse_port: bool) -> list[tuple[str, int]]:
    """The grpc.server options for these limits (names from grpc's channel-argument keys)."""
    return [
        # Serving processes share the supervisor's port; a lone daemon must own its port.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", limits.max_request_bytes),
        ("grpc.keepalive_time_ms", _ms(limits.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", _ms(limits.keepalive_timeout_seconds)),
        # Clients may ping while no call runs (the hsmsign client does not), but not more
        # often than this; two strikes and the connection gets GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(limits.min_client_ping_seconds)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", _ms(limits.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", _ms(limits.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(limits.max_connection_age_grace_seconds)),
    ]


@dataclass(frozen=True, slots=True)
class Oversized:
    """What the pipeline gets instead of a request over its method's size bound."""

    size: int
    limit: int

    def message(self, method: str) -> str:
        return f"the request is {self.size:,} bytes; {method} accepts at most {self.limit:,}"


class CallGate(grpc.ServerInterceptor):
    """What every unary hsmsign call passes before the pipeline: a request over
    ``max_small_request_bytes`` on a method not in LARGE_REQUEST_METHODS becomes an
    ``Oversized`` (the pipeline refuses it and logs it like any other call), and its answer
    carries the ``hsmsign.names.ANSWERED_BY`` mark (trailing metadata: hsmsign.connection
    reads it, so a daemon shutting down is not "cannot reach hsmsignd")."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self._limit = limits.max_small_request_bytes
        # Handlers never change once the server runs: wrap each method's once.
        self._handlers: dict[str, Handler | None] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = continuation(handler_call_details)
        # Only hsmsign's own methods run in the pipeline that refuses an Oversized.
        if method.startswith("/hsmsign.") and handler is not None and handler.unary_unary:
            limit = None if method in LARGE_REQUEST_METHODS else self._limit
            handler = self._gated(handler, handler.unary_unary, limit)
        self._handlers[method] = handler
        return handler

    def _gated(
        self,
        handler: Handler,
        inner: Callable[[Any, grpc.ServicerContext], Any],
        limit: int | None,
    ) -> Handler:
        def gated(request: Any, context: grpc.ServicerContext) -> Any:
            context.set_trailing_metadata((ANSWERED_BY,))
            if limit is not None and isinstance(request, Message):
                size = request.ByteSize()
                if size > limit:
                    return inner(Oversized(size, limit), context)
            return inner(request, context)

        # grpc's method handlers are named tuples.
        replaced: Handler = handler._replace(unary_unary=gated)  # type: ignore[attr-defined]
        return replaced
