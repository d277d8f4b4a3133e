"""The serving threads' waiting room (server/api/workers.py): calls wait as jobs, threads
take them in round-robin order across callers, the room is bounded and shared fairly, and a
job whose caller goes never runs. Real threads; every wait is bounded."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from server.api.admission import Shed
from server.api.workers import FairWorkers, refused_by_room, run_refused

WAIT = 10.0


@pytest.fixture()
def gate() -> Iterator[threading.Event]:
    """Holds the first job on its thread until the test opens it."""
    g = threading.Event()
    yield g
    g.set()


def _record(order: list[str], name: str) -> Callable[[], str]:
    def run() -> str:
        order.append(name)
        return name

    return run


def _hold(gate: threading.Event, started: threading.Event) -> Callable[[], str]:
    def run() -> str:
        started.set()
        assert gate.wait(WAIT)
        return "held"

    return run


def _held(gate: threading.Event, threads: int = 1, max_queued: int = 32) -> FairWorkers:
    """Workers whose one thread is held by a first job of caller a until ``gate`` opens."""
    workers = FairWorkers(threads=threads, max_queued=max_queued)
    started = threading.Event()
    workers.submit("a", "caller a", _hold(gate, started))
    assert started.wait(WAIT)
    return workers


def test_a_caller_with_one_call_goes_before_another_callers_backlog(
    gate: threading.Event,
) -> None:
    workers = FairWorkers(threads=1, max_queued=32)
    started = threading.Event()
    first = workers.submit("a", "caller a", _hold(gate, started))
    assert started.wait(WAIT)
    order: list[str] = []
    backlog = [workers.submit("a", "caller a", _record(order, f"a{i}")) for i in range(10)]
    single = workers.submit("b", "caller b", _record(order, "b"))
    gate.set()
    assert first.future.result(WAIT) == "held"
    assert single.future.result(WAIT) == "b"
    for job in backlog:
        job.future.result(WAIT)
    # Round robin across callers: b's one call after a's next, not after all ten.
    assert order.index("b") == 1, order
    workers.stop()


def test_one_thread_runs_the_jobs_one_after_another_on_itself(gate: threading.Event) -> None:
    workers = _held(gate, max_queued=8)
    ran_on: list[str] = []
    jobs = [
        workers.submit("a", "caller a", lambda: ran_on.append(threading.current_thread().name))
        for _ in range(5)
    ]
    gate.set()
    for job in jobs:
        job.future.result(WAIT)
    assert ran_on == ["rpc-0"] * 5
    workers.stop()


def test_a_full_room_refuses_a_caller_at_its_share(gate: threading.Event) -> None:
    workers = _held(gate, max_queued=3)
    for _ in range(3):
        workers.submit("a", "caller a", lambda: None)
    with pytest.raises(Shed, match=r"4 of them caller a's"):
        workers.submit("a", "caller a", lambda: None)
    workers.stop()


def test_a_newcomer_takes_the_newest_waiting_place_of_the_caller_over_its_share(
    gate: threading.Event,
) -> None:
    workers = _held(gate, max_queued=3)
    waiting = [workers.submit("a", "caller a", lambda: "a") for _ in range(3)]
    newcomer = workers.submit("b", "caller b", lambda: "b")
    # The newest of a's waiting calls was refused to make room; the others still run.
    with pytest.raises(Shed, match="refused to make room") as shed:
        waiting[-1].future.result(WAIT)
    assert shed.value.reason == "shed_pushed_out"
    gate.set()
    assert newcomer.future.result(WAIT) == "b"
    assert [j.future.result(WAIT) for j in waiting[:-1]] == ["a", "a"]
    workers.stop()


def test_a_withdrawn_job_never_runs_and_gives_its_place_back(gate: threading.Event) -> None:
    workers = _held(gate, max_queued=1)
    ran: list[str] = []
    gone = workers.submit("a", "caller a", _record(ran, "gone"))
    assert workers.withdraw(gone)
    assert workers.snapshot()[0] == {"a": 1}  # only the running call holds a place
    after = workers.submit("b", "caller b", _record(ran, "b"))
    gate.set()
    assert after.future.result(WAIT) == "b"
    assert ran == ["b"]
    assert not workers.withdraw(after), "a job that ran cannot be withdrawn"
    workers.stop()


def test_a_job_that_raises_answers_with_its_exception_and_the_thread_goes_on() -> None:
    workers = FairWorkers(threads=1, max_queued=4)

    def fail() -> None:
        raise ValueError("its own failure")

    with pytest.raises(ValueError, match="its own failure"):
        workers.submit("a", "caller a", fail).future.result(WAIT)
    assert workers.submit("a", "caller a", lambda: 7).future.result(WAIT) == 7
    workers.stop()


def test_a_refused_call_runs_with_its_refusal_in_view() -> None:
    shed = Shed("no room", "shed_full")
    assert run_refused(shed, refused_by_room.get) is shed
    assert refused_by_room.get() is None
