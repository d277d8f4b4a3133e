"""One signing call on a channel, answered as (status, details): how the identity, policy and
reload tests see what a caller is told, without each writing its own try/except."""

from __future__ import annotations

import grpc

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc


def sign_status(
    channel: grpc.Channel,
    *,
    metadata: tuple[tuple[str, str], ...] | None = None,
    timeout: float = 30,
) -> tuple[grpc.StatusCode, str]:
    """SignDigest of a fixed SHA-256-sized digest with key 'demo'; OK or the refusal."""
    request = pb.SignDigestRequest(
        key=pb.KeyRef(name="demo"),
        digest=b"\x01" * 32,
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
    )
    try:
        pb_grpc.SignerStub(channel).SignDigest(request, metadata=metadata, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""
