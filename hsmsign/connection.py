"""How the client reaches hsmsignd: the target forms, the gRPC service config (round_robin
over every address with health checking, retries of UNAVAILABLE), keepalive, and how a failed
call becomes one honest line.

Targets (``--server``, ``HSMSIGN_SERVER``, ``Client(target=...)``):

- ``HOST:PORT``: one daemon (a name resolving to several addresses: every one, round_robin);
- ``dns:///NAME:PORT``: every address the name resolves to (a headless Kubernetes Service);
- ``ipv4:A:P,B:P`` / ``ipv6:[A]:P,[B]:P``: gRPC's own forms for a list of addresses;
- ``A:P,B:P``: the same list without the scheme (IP literals; hsmsign adds ``ipv4:`` or
  ``ipv6:``).

gRPC sends each call to the next healthy address (the daemon serves grpc.health.v1; one that
is draining says NOT_SERVING and gets no new calls) and retries a Signer call that failed with
UNAVAILABLE on another address, up to ``MAX_ATTEMPTS`` attempts and always within the call's
own deadline. Signer calls have no side effects, so a retry is safe; KeyAdmin calls are not
retried by this policy.

Connections (``--connections``, ``HSMSIGN_CONNECTIONS``, ``Client(connections=...)``): a
client opens that many channels to the target (with more than one, each with its own
connections: a local subchannel pool), and sends its Signer calls to them in turn. hsmsignd
runs one serving process per CPU on one port, and the kernel spreads *connections*, not
calls, over them: a client with one connection reaches one process however many threads use
it. Channels connect
on their first call, so a client that makes one call at a time opens one connection per
address for each of its first ``connections`` calls and no more.
"""

from __future__ import annotations

import json
from typing import Final

import grpc

from hsmsign.errors import RemoteError, UsageError
from hsmsign.names import ANSWERED_BY

#: Attempts per Signer call, the first included (gRPC's upper bound is 5).
MAX_ATTEMPTS: Final = 5

#: Seconds between keepalive pings while a call is in flight (the daemon refuses pings more
#: often than its server.limits.min_client_ping_seconds, 10 s by default), and seconds to
#: wait for the answer before the connection counts as dead and the call is retried.
KEEPALIVE_SECONDS: Final = 30
KEEPALIVE_TIMEOUT_SECONDS: Final = 10

#: Channels a client opens to its target by default: one, shared with the process's other
#: clients of the same target (gRPC's global subchannel pool), as before connections could be
#: chosen. Reaching every serving process of a daemon with several connections showed that a
#: daemon's serving processes can disagree about the key ring for over 30 s after an offline
#: `hsmsignd keys` change (tests/integration/test_keyring_concurrency.py failed in a quarter
#: to half of its runs): opt in with more until that is fixed. The kernel puts each
#: connection on a serving process by a hash of its ports, so with 2 processes all of N
#: connections land on one with probability 2**(1-N): 1 in 2 for 2 connections, 1 in 8 for 4.
#: Each costs the daemon about 20 KiB and one descriptor per address while it is open.
DEFAULT_CONNECTIONS: Final = 1
#: The most channels a client may open: connections beyond the daemon's processes only add
#: descriptors (server.limits.max_connections counts them).
MAX_CONNECTIONS: Final = 64

#: Largest message either way; a batch of 10,000 RSA-4096 signatures is 5 MB.
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
#: A call's request is kept for retries up to this size (gRPC's default, 256 KiB, is less
#: than a 10,000-digest batch, which would then never be retried).
RETRY_BUFFER_BYTES: Final = 2 * 1024 * 1024

SERVICE_CONFIG: Final = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": "hsmsign.v1.Signer"},
    "methodConfig": [
        {
            "name": [{"service": "hsmsign.v1.Signer"}],
            "retryPolicy": {
                "maxAttempts": MAX_ATTEMPTS,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
    # Each failure costs a token, each success gives 0.1 back, and retries stop at half the
    # tokens: a fleet that is down for everyone is not hammered by every client's retries,
    # while every call in flight on one replica that dies is retried (dozens at 64 callers;
    # 10 tokens let only 5 through: tests/integration/test_replicas.py).
    "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
}


def channel_target(target: str) -> str:
    """The gRPC target for a ``--server`` value (the forms in this module's docstring).
    Raises UsageError for a list with an empty entry or a host name in it."""
    if "," not in target or target.startswith(("ipv4:", "ipv6:")):
        return target  # one address, or a list that already has its scheme
    parts = [p.strip() for p in target.split(",")]
    if any(not p for p in parts):
        raise UsageError(f"--server {target!r} has an empty address; use A:PORT,B:PORT")
    if all(p.startswith("[") for p in parts):
        return "ipv6:" + ",".join(parts)
    hosts = [p.rpartition(":")[0] for p in parts]
    if all(h.count(".") == 3 and h.replace(".", "").isdigit() for h in hosts):
        return "ipv4:" + ",".join(parts)
    raise UsageError(
        f"--server {target!r}: a list takes IP addresses (A:PORT,B:PORT); for host names use "
        "one name that resolves to every replica (dns:///NAME:PORT)"
    )


def parse_connections(text: str, source: str) -> int:
    """The number of connections in ``text``, from ``source`` (a flag or a variable's name).
    Raises UsageError for anything but a whole number from 1 to MAX_CONNECTIONS."""
    value = int(text) if text.strip().isdigit() else 0
    return check_connections(value, f"{source} {text!r}")


def check_connections(value: int, source: str = "connections") -> int:
    """``value`` if it is a usable number of connections; UsageError naming ``source``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CONNECTIONS:
        raise UsageError(
            f"{source}: the number of connections is a whole number from 1 to {MAX_CONNECTIONS}"
        )
    return value


def channel_options(separate: bool = False) -> list[tuple[str, int | str]]:
    """The channel arguments every hsmsign channel uses. With ``separate`` (a client of
    several connections) each channel has its own subchannel pool, so that several channels
    to one target are several connections (gRPC otherwise shares one connection between
    channels with the same target and arguments)."""
    return [
        ("grpc.use_local_subchannel_pool", 1 if separate else 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
        ("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
        ("grpc.keepalive_permit_without_calls", 0),
    ]


def _answered_by_daemon(e: grpc.RpcError) -> bool:
    trailing = getattr(e, "trailing_metadata", None)
    metadata = trailing() if callable(trailing) else None
    return any((k, v) == ANSWERED_BY for k, v in metadata or ())


def remote_error(e: grpc.RpcError, tls_hint: str = "") -> RemoteError:
    """The RemoteError for a failed call: the status name and the daemon's own message; for
    a call that never reached a daemon, "cannot reach hsmsignd" and, where a TLS mismatch is
    the likely cause, ``tls_hint``."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    name = code.name if code is not None else "UNKNOWN"
    if code == grpc.StatusCode.UNAVAILABLE and not _answered_by_daemon(e):
        lowered = (details or "").lower()
        if "unhealthy" in lowered:
            # Reached, but its health service says NOT_SERVING: shutting down or starting.
            details = f"hsmsignd is not serving (shutting down or starting); retry: {details}"
        else:
            details = f"cannot reach hsmsignd: {details}"
            # A refused connection means no daemon there; a connection the daemon closed at
            # once is most often TLS that does not match on the two sides.
            if tls_hint and "refused" not in lowered:
                details += f" ({tls_hint})"
    return RemoteError(name, details or "no details")
