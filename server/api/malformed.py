"""Request bodies that are not the method's message: INVALID_ARGUMENT, not INTERNAL.

grpcio answers a request its deserializer cannot parse with INTERNAL ("Exception
deserializing request!") and logs a traceback, so a caller's garbage looked like a daemon
fault (found by tests/integration/test_malformed_requests.py). This interceptor gives each
unary method a deserializer that hands the pipeline :data:`MALFORMED` instead, and the
pipeline's ``well_formed`` stage answers INVALID_ARGUMENT with one line (and the usual
access-log line).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Malformed:
    """What the lenient deserializer hands over instead of a message it could not parse."""

    def __repr__(self) -> str:
        return "MALFORMED"


MALFORMED = _Malformed()


class MalformedRequests(grpc.ServerInterceptor):
    """Wraps every unary-unary handler once (cached by method) with a lenient deserializer."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        # Only hsmsign's own methods run in the pipeline that turns MALFORMED into a status.
        if not method.startswith("/hsmsign.") or handler is None:
            return handler
        if handler.request_streaming or handler.response_streaming:
            return handler
        parse, behaviour = handler.request_deserializer, handler.unary_unary
        if parse is None or behaviour is None:
            return handler
        wrapped = _wrap(parse, behaviour, handler.response_serializer)
        self._wrapped[method] = wrapped
        return wrapped


def _wrap(
    parse: Callable[[bytes], Any],
    behaviour: Callable[[Any, grpc.ServicerContext], Any],
    serialize: Callable[[Any], bytes] | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError):
            return MALFORMED

    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=lenient, response_serializer=serialize
    )
