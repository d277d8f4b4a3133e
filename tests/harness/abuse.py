"""An abusive client in a process of its own (so that its threads do not slow the measured
caller's), for the admission tests: keeps N signing streams open on one connection for a
while, each sent again as soon as it is answered. Loopback only, bounded in count and time.

Run as ``python -m tests.harness.abuse ADDRESS CA CERT KEY STREAMS SECONDS``; prints one JSON
object: outcome ("OK" or "STATUS: details") -> count, once every stream has ended.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc

from hsmsign.client import TlsOptions
from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc

#: Digests per call: one chunk of a batch, so each call holds a token session a while.
DIGESTS_PER_CALL = 16


def keep_streams(channel: grpc.Channel, streams: int, seconds: float) -> Counter[str]:
    """Keeps ``streams`` SignDigests calls in flight for ``seconds``; their outcomes."""
    stub = pb_grpc.SignerStub(channel)
    request = pb.SignDigestsRequest(
        key=pb.KeyRef(name="demo"),
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
        digests=[hashlib.sha256(bytes([i])).digest() for i in range(DIGESTS_PER_CALL)],
    )
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    ended = threading.Semaphore(0)
    stop_at = time.monotonic() + seconds

    def send() -> None:
        stub.SignDigests.future(request, timeout=60).add_done_callback(done)

    def done(f: grpc.Future[pb.SignDigestsResponse]) -> None:
        try:
            f.result()
            outcome = "OK"
        except grpc.RpcError as e:
            outcome = f"{e.code().name}: {e.details()}"
        with lock:
            outcomes[outcome] += 1
        if time.monotonic() < stop_at:
            send()
        else:
            ended.release()

    for _ in range(streams):
        send()
    for _ in range(streams):
        if not ended.acquire(timeout=seconds + 120):
            raise SystemExit("the streams never ended")
    return outcomes


def main(argv: list[str]) -> int:
    address, ca, cert, key, streams, seconds = argv
    tls = TlsOptions(Path(ca), Path(cert), Path(key))
    with grpc.secure_channel(address, tls.credentials()) as channel:
        outcomes = keep_streams(channel, int(streams), float(seconds))
    print(json.dumps(dict(outcomes)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
