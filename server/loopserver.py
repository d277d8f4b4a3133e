"""The serving process's gRPC server: grpc.aio on an event loop of its own thread, with the
synchronous servicers run on a bounded pool of serving threads (``server.api.dispatch``;
docs/adr/0008-serving-model.md).

``LoopServer`` keeps the calls that serve.py makes of a server synchronous (add a port,
start, stop with a grace period), so the start-up order, the SIGTERM drain and SIGHUP reload
stay as they were. Health is served on the event loop (grpc_health's asyncio servicer), so a
check never waits for a serving thread; ``LoopHealth`` is the synchronous face of it that
the rest of the daemon sets statuses through.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import _async as aio_health
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from server.api.dispatch import Dispatch
from server.config import ServerConfig

T = TypeVar("T")

#: How long calls arriving just before gRPC's shutdown are parked: long enough for every
#: caller's next call to arrive (a round trip) and be handed to a handler, short against a
#: caller's deadline (measured: with 8 callers retrying at once, 3 to 7 calls per stop were
#: answered CANCELLED without it, none with it).
PARK_SECONDS = 0.25


class LoopServer:
    """A grpc.aio server and the thread that runs its event loop."""

    def __init__(
        self, server: ServerConfig, options: Sequence[tuple[str, int]], threads: int
    ) -> None:
        """``threads``: the serving threads the synchronous pipeline runs on
        (``server.api.admission.serving_threads``)."""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="grpc-loop", daemon=True)
        self._thread.start()
        self.pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc")
        self.dispatch = Dispatch(server.limits, self.pool)
        self.aio: grpc.aio.Server = self.run(self._make(server, options))
        self.health = LoopHealth(self)
        #: When the event loop last ran a callback ``responsive`` posted (monotonic).
        self._loop_ran = time.monotonic()
        #: The health-only listener (``server.health_listen``), if any.
        self.health_only: grpc.aio.Server | None = None
        self._started = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _make(
        self, server: ServerConfig, options: Sequence[tuple[str, int]]
    ) -> grpc.aio.Server:
        # grpc.aio binds its server to the event loop running where it is made.
        return grpc.aio.server(
            migration_thread_pool=self.pool,
            interceptors=[self.dispatch],
            options=options,
            maximum_concurrent_rpcs=server.max_concurrent_calls,
        )

    def responsive(self, bound: float) -> bool:
        """Whether the event loop, where every call is received and answered, ran a callback
        within ``bound`` seconds: a non-blocking check for the heartbeat (server/heartbeat.py),
        which asks again each time it is called."""
        ran = self._loop_ran
        self.loop.call_soon_threadsafe(self._mark_loop_ran)
        return time.monotonic() - ran < bound

    def _mark_loop_ran(self) -> None:
        self._loop_ran = time.monotonic()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs ``coroutine`` on the event loop and waits for its result (or exception)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def post(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Runs ``coroutine`` on the event loop; waits for it unless called from the loop."""
        if threading.current_thread() is self._thread:
            self.loop.create_task(coroutine)
        else:
            self.run(coroutine)

    def add_port(self, address: str, creds: grpc.ServerCredentials | None) -> int:
        """Binds ``address``; the port bound, 0 when it cannot be bound."""
        try:
            if creds is None:
                return self.aio.add_insecure_port(address)
            return self.aio.add_secure_port(address, creds)
        except RuntimeError:
            return 0

    def add_health_port(self, address: str, reuse_port: bool) -> int:
        """A second, plaintext listener on ``address`` serving only the health service (its
        statuses are this server's); the port bound, 0 when it cannot be bound."""

        async def make() -> grpc.aio.Server:
            return grpc.aio.server(options=[("grpc.so_reuseport", 1 if reuse_port else 0)])

        self.health_only = self.run(make())
        self.health.add_to(self.health_only)
        try:
            return self.health_only.add_insecure_port(address)
        except RuntimeError:
            return 0

    def start(self) -> None:
        self.run(self.aio.start())
        self._started = True
        if self.health_only is not None:
            self.run(self.health_only.start())

    def stop(self, grace: float) -> None:
        """Stops serving: calls still running after ``grace`` seconds are cancelled; then the
        serving threads and the event loop end. Calls that arrive in the last moment before
        gRPC's shutdown begins are parked until it has (``Dispatch.park``), so that each is
        answered rather than cancelled."""
        self.run(self._stop(grace))
        if self.health_only is not None:
            self.run(self.health_only.stop(0))
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    async def _stop(self, grace: float) -> None:
        if not self._started:  # a start-up that failed: no call to answer
            await self.aio.stop(grace)
            return
        self.dispatch.park()
        await asyncio.sleep(PARK_SECONDS)
        stopping = asyncio.ensure_future(self.aio.stop(grace))
        await asyncio.sleep(0)  # gRPC's shutdown begins (its GOAWAY) before they are answered
        self.dispatch.release()
        await stopping


class LoopHealth(health.HealthServicer):  # type: ignore[misc]  # grpc_health is untyped
    """The health service's statuses, set from any thread and served on the event loop.

    It is a ``grpc_health`` ``HealthServicer`` (what the rest of the daemon is typed to set
    statuses on), but the service registered with gRPC is the asyncio one it forwards to."""

    def __init__(self, server: LoopServer) -> None:
        super().__init__()
        self._server = server
        self.served = aio_health.HealthServicer()

    def add_to(self, aio_server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.served, aio_server)

    def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        super().set(service, status)
        self._server.post(self.served.set(service, status))

    def enter_graceful_shutdown(self) -> None:
        super().enter_graceful_shutdown()
        self._server.post(self.served.enter_graceful_shutdown())
