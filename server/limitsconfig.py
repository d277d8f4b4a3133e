"""[server.limits]: what one client connection and one serving process may hold (message
sizes, keepalive, connection lifetimes and count, the admission queue, the byte budget, how
long a request may take to arrive). Read by ``server.config``; used by ``server.api.limits``,
``server.api.dispatch`` and ``server.api.admission``; docs/operations.md explains each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

from server.tomltable import Table, default_of


@dataclass(frozen=True)
class ConnectionLimits:
    """[server.limits]: what one client connection may cost a serving process. gRPC has one
    receive bound per server (``max_request_bytes``: a batch of 10,000 SHA-512 digests is
    about 660 KB); ``max_small_request_bytes`` bounds every other call (server.api.limits)."""

    #: Largest request message any call may send; larger ones get RESOURCE_EXHAUSTED from
    #: gRPC before they are read into memory.
    max_request_bytes: int = 1024 * 1024
    #: Largest request of the calls that carry one digest, key or ciphertext.
    max_small_request_bytes: int = 64 * 1024
    #: Seconds of silence after which the daemon pings a client connection, and seconds it
    #: waits for the answer before closing it (a peer that vanished frees its descriptor).
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    #: Clients that ping more often than this while no call is running get GOAWAY
    #: (too_many_pings) after two strikes. The hsmsign client pings every 30 s.
    min_client_ping_seconds: float = 10.0
    #: A connection with no call for this long is closed (the client reconnects when needed).
    max_connection_idle_seconds: float = 300.0
    #: A connection this old is asked to reconnect (GOAWAY; gRPC adds +-10% jitter), so that
    #: clients spread again over processes and replicas after a restart; its calls in flight
    #: get ``max_connection_age_grace_seconds`` more to finish.
    max_connection_age_seconds: float = 1800.0
    max_connection_age_grace_seconds: float = 60.0
    #: Calls that may wait for a token session in each serving process, beyond the
    #: token.sessions calls that hold one (server.api.admission). An identity may fill places
    #: nobody else wants, and gives its newest waiting call's place up to an identity with
    #: fewer than its share (the places divided by the identities holding them). A call that
    #: finds no place gets RESOURCE_EXHAUSTED at once; one that waits longer than
    #: token.session_wait_seconds, or past its deadline, leaves the queue unrun.
    max_queued_calls: int = 128
    #: A call whose request has not fully arrived this long after its headers is ended with
    #: DEADLINE_EXCEEDED: a stalled or trickling stream holds a coroutine, never a serving
    #: thread, and not for longer than this (docs/adr/0008-serving-model.md).
    max_request_receive_seconds: float = 10.0
    #: Bytes of large requests (over max_small_request_bytes) each serving process holds at
    #: once; a request that does not fit gets RESOURCE_EXHAUSTED at once ("retry").
    max_bytes_in_flight: int = 32 * 1024 * 1024
    #: Client connections each serving process accepts at once; gRPC closes further ones as
    #: they arrive. Keep it under the process's descriptor limit (LimitNOFILE).
    max_connections: int = 512


_LIMIT_MAXIMA: Final[dict[str, float]] = {
    "max_request_bytes": 2**31 - 1,
    "max_small_request_bytes": 2**31 - 1,
    "max_connection_age_seconds": 365 * 86400.0,
    "max_queued_calls": 100_000,
    "max_bytes_in_flight": 2**40,
    "max_connections": 2**20,
}


def read_limits(s: Table) -> ConnectionLimits:
    """[server.limits] of the [server] table ``s``. Raises ConfigError."""
    t = s.table("limits")
    values = {}
    for f in fields(ConnectionLimits):
        default = default_of(ConnectionLimits, f.name)
        maximum = _LIMIT_MAXIMA.get(f.name, 86400.0)  # seconds: at most a day
        values[f.name] = t.positive(f.name, type(default), default, maximum)
    limits = ConnectionLimits(**values)
    if limits.max_small_request_bytes > limits.max_request_bytes:
        raise t.error(
            "max_small_request_bytes",
            f"got {limits.max_small_request_bytes}; allowed: at most max_request_bytes "
            f"({limits.max_request_bytes})",
        )
    if limits.max_bytes_in_flight < limits.max_request_bytes:
        raise t.error(
            "max_bytes_in_flight",
            f"got {limits.max_bytes_in_flight}; allowed: at least max_request_bytes "
            f"({limits.max_request_bytes})",
        )
    t.finish()
    return limits
