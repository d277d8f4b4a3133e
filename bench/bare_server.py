"""The thinnest signing server the project's stack allows, with none of hsmsign's code.

``python -m bench.bare_server`` serves ``/hsmsign.v1.Signer/SignDigest`` (PKCS#1 v1.5,
SHA-256) the way any Python service on this stack would have to: grpcio's synchronous server,
protobuf messages, python-pkcs11 through p11-kit-proxy onto the same SoftHSM2 token, the same
process layout as hsmsignd (one process per CPU sharing the port with SO_REUSEPORT, 2 sessions
and 4 threads each). It has no key ring, no access log, no error mapping, no checks: the
handler takes a session, signs, answers.

The bench runs it beside the daemon, under the same load, to measure what the stack itself
costs per call. The gap between the token limit and this server is the stack's; the gap
between this server and hsmsignd is hsmsign's.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

PREFIX_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")
METHOD = "SignDigest"
#: What ``--no-sign`` answers: as long as an RSA-2048 signature, made without the token.
NO_SIGNATURE = bytes(256)
SERVICE = "hsmsign.v1.Signer"


class BareServer:
    """A running bare server (its parent process), shaped like the test suite's Daemon for
    the bench's load generators: ``address``, ``proc``, ``log()``, ``stop()``."""

    def __init__(self, token_args: list[str], *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bare_server", *token_args, *extra],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"bench.bare_server exited {self.proc.returncode} at start-up")
        self.address: str = json.loads(line)["address"]

    def log(self) -> str:
        return ""  # no access log: failures are checked by a real call (bench.run)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _handler(sign: Any) -> Any:
    """SignDigest, served by ``sign`` (a function, or a coroutine function for grpc.aio)."""
    import grpc

    from hsmsign.v1 import hsmsign_pb2 as pb

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            METHOD: grpc.unary_unary_rpc_method_handler(
                sign,
                request_deserializer=pb.SignDigestRequest.FromString,
                response_serializer=pb.SignDigestResponse.SerializeToString,
            )
        },
    )


def _serve_one(args: argparse.Namespace) -> int:
    os.environ["SOFTHSM2_CONF"] = args.conf
    import grpc
    import pkcs11
    from pkcs11 import Attribute, Mechanism, ObjectClass

    from hsmsign.v1 import hsmsign_pb2 as pb
    from tests.harness.paths import PROXY_MODULE

    lib = pkcs11.lib(PROXY_MODULE)
    tok = lib.get_token(token_label=args.label)
    login = tok.open(user_pin=Path(args.pin_file).read_text(), rw=True)
    keys: queue.SimpleQueue[Any] = queue.SimpleQueue()
    for _ in range(args.sessions):
        s = tok.open(rw=True)
        found = [
            o
            for o in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
            if o[Attribute.LABEL] == f"hsmsign:{args.key}:v1"
        ]
        if len(found) != 1:
            print(
                f"bare_server: no private key hsmsign:{args.key}:v1 on the token", file=sys.stderr
            )
            return 1
        keys.put(found[0])

    def sign_blocking(digest: bytes) -> bytes:
        if args.no_sign:
            return NO_SIGNATURE
        k = keys.get()
        try:
            return bytes(k.sign(PREFIX_SHA256 + digest, mechanism=Mechanism.RSA_PKCS))
        finally:
            keys.put(k)

    if args.aio:
        return _serve_aio(args, sign_blocking, pb)

    def sign(request: Any, context: Any) -> Any:
        return pb.SignDigestResponse(signature=sign_blocking(request.digest))

    handler = _handler(sign)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.threads),
        options=[("grpc.so_reuseport", 1)],
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(f"127.0.0.1:{args.port}") == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server.start()
    print("ready", flush=True)
    stop.wait()
    server.stop(1).wait()
    login.close()
    return 0


def _serve_aio(args: argparse.Namespace, sign_blocking: Callable[[bytes], bytes], pb: Any) -> int:
    import asyncio

    import grpc

    pool = futures.ThreadPoolExecutor(max_workers=args.sessions)

    async def sign(request: Any, context: Any) -> Any:
        if args.aio == "inline":
            sig = sign_blocking(request.digest)
        else:
            sig = await asyncio.get_running_loop().run_in_executor(
                pool, sign_blocking, request.digest
            )
        return pb.SignDigestResponse(signature=sig)

    async def run() -> int:
        handler = _handler(sign)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        server.add_generic_rpc_handlers((handler,))
        if server.add_insecure_port(f"127.0.0.1:{args.port}") == 0:
            return 1
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await server.start()
        print("ready", flush=True)
        await stop.wait()
        await server.stop(1)
        return 0

    return asyncio.run(run())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conf", required=True, help="SOFTHSM2_CONF of the token")
    p.add_argument("--label", required=True, help="token label")
    p.add_argument("--pin-file", required=True, help="file holding the user PIN")
    p.add_argument("--key", required=True, help="key name (the object hsmsign:NAME:v1)")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.add_argument("--sessions", type=int, default=2, help="sessions per process")
    p.add_argument("--threads", type=int, default=4, help="gRPC threads per process")
    p.add_argument(
        "--aio",
        choices=("inline", "executor"),
        help="grpc.aio instead of the threaded server: sign on the event loop, or on a pool",
    )
    p.add_argument(
        "--no-sign",
        action="store_true",
        help="answer without calling the token: what gRPC alone costs (the bench runs the "
        "token's signatures beside it in another process)",
    )
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return _serve_one(args)
    # Hold the port (SO_REUSEPORT, not listening) so the serving processes can all bind it.
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    cmd = [sys.executable, "-m", "bench.bare_server", *sys.argv[1:], "--one", "--port", str(port)]
    # One at a time, each ready before the next starts: SoftHSM2 processes that load the
    # module and log in at the same moment can miss the token or fail the login (hsmsignd's
    # serving processes take a lock for the same reason, server/serve.py).
    children: list[subprocess.Popen[str]] = []
    for _ in range(args.processes):
        c = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        children.append(c)
        assert c.stdout is not None
        if c.stdout.readline().strip() != "ready":
            for d in children:
                d.kill()
            print("a serving process did not start", file=sys.stderr)
            return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps({"address": f"127.0.0.1:{port}", "pids": [c.pid for c in children]}))
    sys.stdout.flush()
    stop.wait()
    for c in children:
        c.terminate()
    for c in children:
        c.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
