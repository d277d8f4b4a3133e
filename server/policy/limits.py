"""Per-identity rate (token bucket) and concurrency limits, per serving process.

A reloaded policy (SIGHUP) takes over what callers have used so far: the buckets and the
calls in flight carry over to the new limiter, so a reload never hands out a fresh allowance.

Excess is refused at once (RESOURCE_EXHAUSTED with a retry hint), never queued: a caller
over its share must not hold a worker thread of the daemon.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from server.errors import Busy
from server.identity.model import Identity
from server.policy.model import Limit, Policy

#: Identities remembered at most; beyond that, idle ones are forgotten (their buckets full).
MAX_TRACKED = 10_000
#: The retry hint when the concurrency cap is the limit: calls here take milliseconds.
CONCURRENCY_RETRY_MS = 50


class LimitExceeded(Busy):
    """An identity is over its rate or concurrency limit."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


@dataclass
class _State:
    tokens: float
    stamp: float
    in_flight: int = 0


class Limiter:
    """The limits of every identity seen by this process."""

    def __init__(
        self,
        policy: Policy,
        clock: Callable[[], float] = time.monotonic,
        previous: Limiter | None = None,
    ) -> None:
        """``previous``: the limiter of the policy this one replaces; its state (and its
        lock, which calls still in flight under it release their slots with) is shared."""
        self._policy = policy
        self._clock = clock
        self._lock: threading.Lock = previous._lock if previous else threading.Lock()
        self._states: dict[str, _State] = previous._states if previous else {}

    def _state(self, key: str, limit: Limit, now: float) -> _State:
        state = self._states.get(key)
        if state is None:
            if len(self._states) >= MAX_TRACKED:
                self._forget_idle(now)
            state = self._states[key] = _State(tokens=_burst(limit), stamp=now)
        return state

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, s in self._states.items() if s.in_flight == 0]:
            del self._states[key]

    @contextlib.contextmanager
    def admit(self, identity: Identity) -> Iterator[None]:
        """Holds one of the identity's concurrent slots for the ``with`` body. Raises
        LimitExceeded (with ``retry_after_ms``) when the identity is over a limit."""
        limit = self._policy.limit_for(identity)
        if limit.rate is None and limit.concurrent is None:
            yield
            return
        with self._lock:
            now = self._clock()
            state = self._state(identity.limit_key, limit, now)
            if limit.rate is not None:
                state.tokens = min(_burst(limit), state.tokens + (now - state.stamp) * limit.rate)
                state.stamp = now
                if state.tokens < 1.0:
                    wait_ms = math.ceil((1.0 - state.tokens) / limit.rate * 1000)
                    raise LimitExceeded(
                        f"{identity.describe()} is over its rate of {limit.rate:g} calls/s; "
                        f"retry in {wait_ms} ms",
                        wait_ms,
                    )
            if limit.concurrent is not None and state.in_flight >= limit.concurrent:
                raise LimitExceeded(
                    f"{identity.describe()} has {state.in_flight} calls in flight (its limit); "
                    f"retry in {CONCURRENCY_RETRY_MS} ms",
                    CONCURRENCY_RETRY_MS,
                )
            if limit.rate is not None:
                state.tokens -= 1.0
            state.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                state.in_flight -= 1


def _burst(limit: Limit) -> float:
    if limit.rate is None:
        return 0.0
    return max(1.0, limit.burst if limit.burst is not None else limit.rate)
