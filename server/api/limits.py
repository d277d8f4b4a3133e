"""What one client connection may cost a serving process: the gRPC server options for
message size, keepalive and connection lifetimes, and the per-method request size bound.

gRPC Python has one receive limit per server, so the transport's bound is the largest any
call needs (the batch calls) and ``server.api.dispatch`` hands the call pipeline an
``Oversized`` in place of a larger request on the other calls; its ``well_formed`` stage
answers RESOURCE_EXHAUSTED before the handler runs. The values come from [server.limits]
(``server.config.ConnectionLimits``); docs/operations.md explains them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from server.limitsconfig import ConnectionLimits

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
        # grpcio 1.85's server does not close a connection whose peer never acknowledges a
        # keepalive PING on keepalive_timeout_ms alone (measured: still open 40 s after a
        # 1 s timeout); the PING acknowledgement timeout is what closes it.
        ("grpc.http2.ping_timeout_ms", _ms(limits.keepalive_timeout_seconds)),
        # Clients may ping while no call runs (the hsmsign client does not), but not more
        # often than this; two strikes and the connection gets GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(limits.min_client_ping_seconds)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", _ms(limits.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", _ms(limits.max_connection_age_seconds)),
        ("grpc.max_connection_age_grace_ms", _ms(limits.max_connection_age_grace_seconds)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
    ]


@dataclass(frozen=True, slots=True)
class Oversized:
    """What the pipeline gets instead of a request over its method's size bound."""

    size: int
    limit: int

    def message(self, method: str) -> str:
        return f"the request is {self.size:,} bytes; {method} accepts at most {self.limit:,}"


@dataclass(frozen=True, slots=True)
class NotReceived:
    """What the pipeline gets instead of a request that did not arrive within
    ``max_request_receive_seconds`` of its call's start (``server.api.dispatch``)."""

    seconds: float

    def message(self) -> str:
        return f"the request did not arrive within {self.seconds:g} s of the call's start"
