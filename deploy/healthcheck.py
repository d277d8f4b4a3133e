"""The container's health check: asks hsmsignd's gRPC health service whether a service is
SERVING, over plaintext (the daemon's `[server] health_listen` port, which serves health
only, so that a check neither needs a client certificate nor waits behind signing calls).

    python3 /opt/hsmsign/healthcheck.py [ADDRESS [SERVICE]]

ADDRESS defaults to $HSMSIGND_HEALTH_ADDRESS, else 127.0.0.1:8081; SERVICE to
hsmsign.v1.Signer (NOT_SERVING while draining, or while the token or the audit trail fails).
Exit 0 when SERVING; 1, with one line on stderr, otherwise.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:8081"
DEFAULT_SERVICE = "hsmsign.v1.Signer"
TIMEOUT_SECONDS = 3.0


def main(argv: list[str]) -> int:
    address = argv[0] if argv else os.environ.get("HSMSIGND_HEALTH_ADDRESS", DEFAULT_ADDRESS)
    service = argv[1] if len(argv) > 1 else DEFAULT_SERVICE
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_SECONDS
            )
        except grpc.RpcError as e:
            print(f"hsmsignd health {address} {service}: {e.code().name}", file=sys.stderr)
            return 1
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        print(f"hsmsignd health {address} {service}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
