"""Request bodies that are not the method's message: INVALID_ARGUMENT, not INTERNAL.

grpcio answers a request its deserializer cannot parse with INTERNAL ("Exception
deserializing request!") and logs a traceback, so a caller's garbage looked like a daemon
fault (found by tests/integration/test_malformed_requests.py). This interceptor gives each
unary method a deserializer that reports the failure to the handler, which answers
INVALID_ARGUMENT with one line and writes the usual access-log line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from server.api.accesslog import access

#: What the lenient deserializer hands over instead of a message it could not parse.
_MALFORMED = object()


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
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        parse, behaviour = handler.request_deserializer, handler.unary_unary
        if parse is None or behaviour is None:
            return handler
        wrapped = _wrap(method, parse, behaviour, handler.response_serializer)
        self._wrapped[method] = wrapped
        return wrapped


def _wrap(
    method: str,
    parse: Callable[[bytes], Any],
    behaviour: Callable[[Any, grpc.ServicerContext], Any],
    serialize: Callable[[Any], bytes] | None,
) -> grpc.RpcMethodHandler[Any, Any]:
    name = method.rpartition("/")[2]

    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except (DecodeError, ValueError):
            return _MALFORMED

    def guarded(request: Any, context: grpc.ServicerContext) -> Any:
        if request is _MALFORMED:
            access.line(name, context.peer(), "INVALID_ARGUMENT", "-", 0.0)
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {method} request message",
            )
        return behaviour(request, context)

    return grpc.unary_unary_rpc_method_handler(
        guarded, request_deserializer=lenient, response_serializer=serialize
    )
