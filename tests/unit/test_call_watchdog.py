"""The token-call watchdog's rules (server/pkcs11/watchdog.py) and the heartbeat slots
(server/heartbeat.py), in-process; the integration tests drive them through a real token
(tests/integration/test_token_watchdog.py, test_process_health.py)."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from server.errors import EXIT_TOKEN_HUNG, TokenUnavailable
from server.heartbeat import Heartbeats
from server.pkcs11.watchdog import CallOverdue, CallWatchdog


class _Exits:
    def __init__(self) -> None:
        self.codes: list[int] = []

    def __call__(self, code: int) -> None:
        self.codes.append(code)


def _watchdog(exits: _Exits, stuck_exit: float = 60.0) -> CallWatchdog:
    return CallWatchdog(0.2, 5.0, stuck_exit, exit=exits)


def test_a_call_within_its_limit_returns_its_value() -> None:
    wd = _watchdog(_Exits())
    try:
        assert wd.run("signing", lambda: 42) == 42
        assert wd.healthy() and wd.overdue_total == 0
    finally:
        wd.close()


def test_an_error_within_the_limit_is_the_callers() -> None:
    wd = _watchdog(_Exits())
    try:
        with pytest.raises(ZeroDivisionError):
            wd.run("signing", lambda: 1 // 0)
    finally:
        wd.close()


def test_a_call_past_its_limit_is_unavailable_and_health_follows() -> None:
    exits = _Exits()
    wd = _watchdog(exits)
    health: list[bool] = []
    wd.on_health(health.append)
    try:
        with pytest.raises(CallOverdue) as e:
            wd.run("signing with X", lambda: time.sleep(0.8))
        assert isinstance(e.value, TokenUnavailable)  # UNAVAILABLE: the client retries
        assert "signing with X" in str(e.value) and "token.call_timeout_seconds" in str(e.value)
        assert health == [False, True] and wd.healthy() and wd.overdue_total == 1
        assert exits.codes == []
    finally:
        wd.close()


def test_key_generation_has_its_own_limit() -> None:
    wd = _watchdog(_Exits())
    try:

        def generate() -> int:
            time.sleep(0.6)
            return 7

        assert wd.run("making a key pair", generate, keygen=True) == 7
    finally:
        wd.close()


def test_a_call_stuck_past_the_exit_limit_ends_the_process() -> None:
    exits = _Exits()
    wd = _watchdog(exits, stuck_exit=0.3)
    release = threading.Event()
    t = threading.Thread(target=lambda: _swallow(wd, release))
    t.start()
    try:
        deadline = time.monotonic() + 10
        while not exits.codes:
            assert time.monotonic() < deadline, "the watchdog never gave up"
            time.sleep(0.05)
        assert exits.codes == [EXIT_TOKEN_HUNG]
    finally:
        release.set()
        t.join(10)
        wd.close()


def _swallow(wd: CallWatchdog, release: threading.Event) -> None:
    with contextlib.suppress(CallOverdue):
        wd.run("signing", lambda: release.wait(10))


def test_the_watchdog_thread_reports_itself_alive() -> None:
    wd = _watchdog(_Exits())
    try:
        time.sleep(0.3)
        assert wd.alive()
    finally:
        wd.close()


def test_heartbeat_slots_are_per_process() -> None:
    beats = Heartbeats.create(3)
    other = Heartbeats(beats.fd, 3)  # another process maps the same memfd
    assert [beats.last(i) for i in (1, 2, 3)] == [0, 0, 0]
    before = time.monotonic_ns()
    other.beat(2)
    assert beats.last(1) == beats.last(3) == 0 and beats.last(2) >= before
    beats.clear(2)
    assert beats.last(2) == 0
