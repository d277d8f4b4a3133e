"""The token's session pool lends in arrival order and times out cleanly (server.token)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, cast

import pytest

from server.pkcs11.pool import SessionPool
from server.pkcs11.session import Session


def _session(name: str) -> Session:
    return Session(cast(Any, name))  # a pool only moves sessions around


def test_a_returned_session_goes_to_the_longest_waiter() -> None:
    pool: SessionPool[Session] = SessionPool()
    first = _session("s1")
    pool.put(first)
    held = pool.get(timeout=1)
    got: list[str] = []
    waiters = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: got.append(f"w{i}:{pool.get(timeout=10).raw}"))
        t.start()
        waiters.append(t)
        time.sleep(0.05)  # w0 waits longest, then w1, ...
    # A newcomer asking now must not jump the queue: nothing is free for it.
    with pytest.raises(queue.Empty):
        pool.get_nowait()
    for i in range(5):
        pool.put(held if i == 0 else _session(f"s{i + 1}"))
        # Handed over at once: a caller arriving right after the return cannot take it
        # (with a plain queue it could, however long the others had waited).
        with pytest.raises(queue.Empty):
            pool.get_nowait()
        time.sleep(0.05)
    for t in waiters:
        t.join(5)
    assert got == ["w0:s1", "w1:s2", "w2:s3", "w3:s4", "w4:s5"]


def test_waiting_too_long_raises_empty_and_leaves_no_trace() -> None:
    pool: SessionPool[Session] = SessionPool()
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        pool.get(timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    # The timed-out waiter is gone: a returned session is free for the next caller.
    s = _session("s")
    pool.put(s)
    assert pool.get_nowait() is s


def test_many_threads_share_few_sessions_without_loss() -> None:
    pool: SessionPool[Session] = SessionPool()
    for i in range(2):
        pool.put(_session(f"s{i}"))
    holder: dict[int, int] = {}  # id(session) -> the borrower holding it now
    lock = threading.Lock()
    errors: list[str] = []
    lends = [0]

    def work(me: int) -> None:
        for _ in range(200):
            s = pool.get(timeout=10)
            with lock:
                if id(s) in holder:
                    errors.append(f"{s.raw} lent to {me} while {holder[id(s)]} held it")
                holder[id(s)] = me
                lends[0] += 1
            # Hold it across thread switches, as a call does: a second borrower of the same
            # session would now overlap with this one and be seen above.
            time.sleep(0.0005)
            with lock:
                if holder.get(id(s)) == me:
                    del holder[id(s)]
            pool.put(s)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert lends[0] == 8 * 200 and not errors, errors[:3]
    assert {pool.get_nowait().raw, pool.get_nowait().raw} == {"s0", "s1"}
    with pytest.raises(queue.Empty):
        pool.get_nowait()
