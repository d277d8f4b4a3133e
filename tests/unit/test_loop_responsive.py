"""The heartbeat's event-loop check (server/heartbeat.py, ``LoopServer.responsive``): a
serving process whose gRPC event loop is blocked stops beating, so its supervisor replaces
it; before, only a stopped process or a dead token-call watchdog did (issue 16). A real
grpc.aio server on its loop thread, blocked by a callback that sleeps."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from server.config import ServerConfig
from server.loopserver import LoopServer

BOUND = 0.5


@pytest.fixture()
def loop_server() -> Iterator[LoopServer]:
    server = LoopServer(ServerConfig(processes=1, threads=2), [], threads=2)
    yield server
    server.stop(0)


def _until(check: bool, server: LoopServer, within: float) -> float | None:
    """Seconds until ``responsive(BOUND)`` answers ``check``, or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if server.responsive(BOUND) is check:
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def test_a_blocked_event_loop_fails_the_check_until_it_runs_again(loop_server: LoopServer) -> None:
    assert _until(True, loop_server, 2.0) is not None, "an idle loop must pass"
    loop_server.loop.call_soon_threadsafe(time.sleep, 3 * BOUND)  # blocks the loop thread
    failed_after = _until(False, loop_server, 3 * BOUND)
    assert failed_after is not None, "a loop blocked for 3 bounds still passed the check"
    assert failed_after <= BOUND + 0.3
    assert _until(True, loop_server, 4 * BOUND) is not None, "the loop ran again: it must pass"


def test_the_check_never_blocks_its_caller(loop_server: LoopServer) -> None:
    loop_server.loop.call_soon_threadsafe(time.sleep, 1.0)
    t0 = time.monotonic()
    loop_server.responsive(BOUND)
    assert time.monotonic() - t0 < 0.1
