"""The admission controller (server.api.admission): bounded places, fair turns at the token
across identities, shed calls refused at once, and callers that go never run."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.admission import QUANTUM, AdmissionController, Shed, Ticket, _Waiter
from server.errors import DeadlineExceeded


def _never_gone() -> None:
    return None


def _controller(capacity: int = 2, max_queued: int = 4, wait: float = 5.0) -> AdmissionController:
    return AdmissionController(capacity, max_queued, wait)


def test_a_full_process_refuses_an_identity_at_its_share_at_once() -> None:
    c = _controller(capacity=1, max_queued=3)
    tickets = [c.enter("a", "identity a") for _ in range(4)]
    with pytest.raises(Shed, match=r"hsmsignd is full: 4 calls .* 4 of them identity a's"):
        c.enter("a", "identity a")
    assert c.counts.shed_full == 1
    for t in tickets:
        c.leave(t)
    c.enter("a", "identity a")  # room again


def test_a_newcomer_below_its_share_takes_the_newest_waiting_place_of_the_identity_over_it() -> (
    None
):
    c = _controller(capacity=1, max_queued=3)
    a = [c.enter("a", "identity a") for _ in range(4)]
    running = c.request(a[0])
    waiting = [c.request(t) for t in a[1:]]
    assert running.granted and not any(w.granted for w in waiting)
    b = c.enter("b", "identity b")  # the process is full, but b has none of its share (2)
    assert waiting[-1].ticket.shed is not None and "identity a had 4" in waiting[-1].ticket.shed
    with pytest.raises(Shed):
        c.request(a[3])
    assert c.counts.shed_pushed_out == 1
    # a has 3 of 4 places now: b may take one more (its share is 2), then a gives another up.
    c.enter("b", "identity b")
    assert waiting[-2].ticket.shed is not None
    with pytest.raises(Shed, match="identity b's"):
        c.enter("b", "identity b")
    # A started call is never pushed out: a's first call keeps its turn.
    assert running.ticket.shed is None and b.shed is None


def test_a_call_that_started_keeps_its_place() -> None:
    c = _controller(capacity=1, max_queued=0)
    a = c.enter("a", "identity a")
    assert c.request(a).granted
    with pytest.raises(Shed):
        c.enter("b", "identity b")  # a's only call is running: nothing to push out


def test_turns_alternate_between_a_batch_and_single_digests() -> None:
    c = _controller(capacity=1, max_queued=100)
    batch = c.enter("batch", "the batch caller")
    first = c.request(batch, QUANTUM)
    assert first.granted
    chunks = [c.request(batch, QUANTUM) for _ in range(3)]
    singles = [c.request(c.enter("one", "the other caller"), 1) for _ in range(3 * QUANTUM)]
    holding, order = [first], []
    for _ in range(len(chunks) + len(singles)):
        c.release(holding.pop().ticket)
        granted = [w for w in chunks + singles if w.granted and w not in order]
        assert len(granted) == 1  # one turn: one call at a time
        order += granted
        holding += granted
    # Each round: one chunk of QUANTUM digests, then QUANTUM single digests.
    kinds = ["chunk" if w in chunks else "single" for w in order]
    assert kinds == (["chunk"] + ["single"] * QUANTUM) * 3


def test_an_identity_at_its_share_of_sessions_waits_while_another_is_below_it() -> None:
    c = _controller(capacity=2, max_queued=10)
    a = c.enter("a", "identity a")
    assert c.request(a).granted and c.request(a).granted  # alone: both sessions
    more_a = c.request(a)
    b = c.enter("b", "identity b")
    wb = c.request(b)
    c.release(a)
    assert wb.granted and not more_a.granted  # a holds its share (1) while b waits
    c.release(b)
    assert more_a.granted  # nobody else waits: a may use both again


def test_a_waiting_call_whose_caller_goes_leaves_the_queue_and_never_runs() -> None:
    c = _controller(capacity=1, max_queued=4)
    holder = c.enter("a", "identity a")
    c.request(holder)
    waiting = c.enter("b", "identity b")
    looks = []

    def gone() -> None:
        looks.append(1)
        if len(looks) >= 2:
            raise DeadlineExceeded("the caller's deadline passed")

    with pytest.raises(DeadlineExceeded):
        c.acquire(waiting, 1, gone, deadline=time.monotonic() + 0.05)
    assert waiting.held == 0 and c.counts.caller_gone == 1
    c.release(holder)
    _, held, queued = c.snapshot()
    assert held == {} and queued == {}  # the turn went to nobody: b's call left


def test_a_call_that_waits_too_long_is_shed() -> None:
    c = _controller(capacity=1, max_queued=4, wait=0.05)
    holder = c.enter("a", "identity a")
    c.request(holder)
    with pytest.raises(Shed, match=r"no token session came free for 0\.05s"):
        c.acquire(c.enter("b", "identity b"), 1, _never_gone)
    assert c.counts.shed_waited_too_long == 1
    assert "1 call shed" in c.summary()


def test_threads_never_hold_more_turns_than_the_capacity_and_all_finish() -> None:
    c = _controller(capacity=2, max_queued=64)
    holding = Counter[str]()
    peak = [0]
    lock = threading.Lock()
    served = Counter[str]()

    def caller(who: str, calls: int, cost: int) -> None:
        for _ in range(calls):
            t = c.enter(who, who)
            try:
                c.acquire(t, cost, _never_gone)
                with lock:
                    holding[who] += 1
                    peak[0] = max(peak[0], sum(holding.values()))
                time.sleep(0.001)
                with lock:
                    holding[who] -= 1
                c.release(t)
                served[who] += 1
            finally:
                c.leave(t)

    threads = [threading.Thread(target=caller, args=("batch", 40, QUANTUM)) for _ in range(8)]
    threads += [threading.Thread(target=caller, args=("single", 40, 1)) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads)
    assert served == {"batch": 320, "single": 80}
    assert peak[0] <= 2
    assert c.snapshot() == ({}, {}, {})


# -- properties -----------------------------------------------------------------------------

IDENTITIES = ("a", "b", "c")

#: One step: a new call of an identity asks for a turn of some cost, or the oldest holder
#: gives its turn back (and, half the time, its call asks again: a batch's next chunk).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from(IDENTITIES), st.integers(1, QUANTUM)),
        st.tuples(st.just("release"), st.booleans(), st.integers(1, QUANTUM)),
    ),
    max_size=120,
)


def _check_bounds(c: AdmissionController, held_by: dict[str, int]) -> None:
    inside, held, queued = c.snapshot()
    assert sum(inside.values()) <= c.places
    assert sum(held.values()) <= c.capacity
    assert held == {k: v for k, v in held_by.items() if v}
    # Work-conserving: a free turn never stays free while a call waits for one.
    assert sum(held.values()) == c.capacity or not queued


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(1, 3), max_queued=st.integers(0, 6), script=steps)
def test_bounds_hold_and_turns_go_to_identities_below_their_share(
    capacity: int, max_queued: int, script: list[tuple[str, object, int]]
) -> None:
    c = AdmissionController(capacity, max_queued, 5.0)
    holders: list[_Waiter] = []
    waiting: list[_Waiter] = []
    held_by: Counter[str] = Counter()

    def note_grants() -> None:
        newly = [w for w in waiting if w.granted]
        for w in newly:
            waiting.remove(w)
            holders.append(w)
            held_by[w.ticket.who] += 1
        waiting[:] = [w for w in waiting if w.ticket.shed is None]

    for step in script:
        if step[0] == "call":
            who, cost = str(step[1]), step[2]
            try:
                t = c.enter(who, who)
            except Shed:
                _check_bounds(c, held_by)
                continue
            waiting.append(c.request(t, cost))
        elif holders:
            w = holders.pop(0)
            share_before = _share(c)
            below_waiting = {x.ticket.who for x in waiting if held_by[x.ticket.who] < share_before}
            held_by[w.ticket.who] -= 1
            c.release(w.ticket)
            again = bool(step[1])
            if again:
                waiting.append(c.request(w.ticket, step[2]))
            granted = [x for x in waiting if x.granted]
            for x in granted:
                # The turn goes to an identity below its share when one was waiting.
                assert not below_waiting or x.ticket.who in below_waiting | {w.ticket.who}
            if not again:
                c.leave(w.ticket)
        note_grants()
        _check_bounds(c, held_by)


def _share(c: AdmissionController) -> int:
    _, held, queued = c.snapshot()
    identities = len(set(held) | set(queued))
    return max(1, -(-c.capacity // identities)) if identities else c.capacity


@settings(max_examples=100, deadline=None)
@given(
    capacity=st.integers(1, 3),
    backlog=st.dictionaries(
        st.sampled_from(IDENTITIES),
        st.lists(st.integers(1, QUANTUM), min_size=1, max_size=30),
        min_size=2,
    ),
)
def test_no_identity_starves_behind_another(capacity: int, backlog: dict[str, list[int]]) -> None:
    """Every identity with waiting calls gets a turn within a bounded amount of the others'
    work: deficit round-robin gives each at most a quantum (plus one call) per round."""
    c = AdmissionController(capacity, 1000, 5.0)
    waiting: list[_Waiter] = []
    for who, costs in backlog.items():
        waiting += [c.request(c.enter(who, who), cost) for cost in costs]
    holders = [w for w in waiting if w.granted]
    done: list[_Waiter] = []
    since_last: Counter[str] = Counter()  # others' work since each identity's last turn
    bound = (len(backlog) - 1) * 2 * QUANTUM + capacity * QUANTUM
    while holders:
        w = holders.pop(0)
        c.release(w.ticket)
        done.append(w)
        for x in waiting:
            if x.granted and x not in done and x not in holders:
                holders.append(x)
                for who in backlog:
                    if who != x.ticket.who:
                        since_last[who] += x.cost
                since_last[x.ticket.who] = 0
        pending = {x.ticket.who for x in waiting if not x.granted}
        for who in pending:
            assert since_last[who] <= bound, (who, since_last, bound)
    assert all(w.granted for w in waiting)


def test_ticket_is_named_for_messages() -> None:
    assert Ticket("k", "mtls identity 'x'").label == "mtls identity 'x'"
