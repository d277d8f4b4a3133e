"""The pure rules that keep key-ring writes safe across daemons (docs/adr/0007): a scan that
finds less than was seen is doubted, never taken as generation 0; every document lists the
writes it includes; a version the token refuses is listed as disabled; the token refusal of a
disabled version maps to FAILED_PRECONDITION; one host lock excludes two holders."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pkcs11.exceptions as p11e
from hypothesis import given
from hypothesis import strategies as st

from server.errors import FailedPrecondition
from server.keyring import join
from server.keyring import state as state_doc
from server.keyring.hostlock import HostLock
from server.keyring.model import State
from server.keyring.state import APPLIED_WRITES, RingState
from server.pkcs11.errors import classify, key_function_not_permitted
from tests.unit.test_keyring_join import obj, rec, ring


def _docs(*generations: int) -> list[tuple[object, RingState]]:
    return [(object(), RingState(generation=g, writer=f"w{i}")) for i, g in enumerate(generations)]


def test_no_document_after_one_was_seen_is_doubted_not_generation_0() -> None:
    assert state_doc.doubt(_docs(), 0) is None  # a new token: nothing seen yet
    assert "no key-ring state document" in (state_doc.doubt(_docs(), 7) or "")
    assert "generation 5" in (state_doc.doubt(_docs(5), 7) or "")
    assert state_doc.doubt(_docs(7), 7) is None
    assert state_doc.doubt(_docs(6, 8), 7) is None


def test_colliding_writers_leave_several_documents_at_the_top() -> None:
    assert [s.generation for s in state_doc.top(_docs(3, 4, 4))] == [4, 4]
    assert len(state_doc.top(_docs(3, 4))) == 1
    assert state_doc.top([]) == []


@given(st.lists(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16), max_size=150))
def test_each_document_lists_the_last_writes_it_includes(writers: list[str]) -> None:
    state = RingState()
    for w in writers:
        state = state.successor(w)
    assert state.generation == len(writers)
    assert state.applied == writers[-APPLIED_WRITES:]
    again = RingState.from_bytes(state.to_bytes())
    assert (again.generation, again.applied) == (state.generation, state.applied)


def test_a_document_without_the_applied_list_still_reads() -> None:
    old = b'{"format":1,"generation":3,"writer":"w","keys":{}}'
    assert RingState.from_bytes(old).applied == []


def test_a_version_the_token_refuses_is_listed_disabled() -> None:
    state = ring(v1=rec("enabled", 1), v2=rec("enabled", 2), primary=1)
    keys = join.build_keys([obj("demo", 1), obj("demo", 2, sign=False)], state)
    v2 = keys["demo"].version(2)
    assert v2.state is State.DISABLED and v2.has_objects
    assert keys["demo"].primary is not None and keys["demo"].primary.version == 1
    assert join.usable_against_state(keys) == []


def test_a_version_disabled_in_the_state_but_usable_in_the_token_is_to_be_refused() -> None:
    state = ring(v1=rec("enabled", 1), v2=rec("disabled", 2), v3=rec("disabled", 3), primary=1)
    keys = join.build_keys([obj("demo", 1), obj("demo", 2), obj("demo", 3, sign=False)], state)
    assert [v.version for v in join.usable_against_state(keys)] == [2]


def test_an_unfinished_destruction_of_a_refused_key_is_still_due() -> None:
    state = ring(v1=rec("enabled", 1), v2=rec("destroyed", 2), primary=1)
    keys = join.build_keys([obj("demo", 1), obj("demo", 2, sign=False)], state)
    assert [v.version for v in join.due_for_destruction(keys, state)] == [2]
    gone = join.build_keys([obj("demo", 1)], state)
    assert not gone["demo"].version(2).has_objects
    assert join.due_for_destruction(gone, state) == []


def test_the_tokens_refusal_of_a_disabled_key_is_failed_precondition() -> None:
    refused = p11e.PKCS11Error("Unmapped error code 0x68")
    assert key_function_not_permitted(refused)
    assert not key_function_not_permitted(p11e.GeneralError())
    err = classify(refused, "signing")
    assert isinstance(err, FailedPrecondition) and "disabled" in str(err)


def test_the_host_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    first, second = HostLock(tmp_path / "ring.lock"), HostLock(tmp_path / "ring.lock")
    order: list[str] = []

    def other() -> None:
        with second.held():
            order.append("second")

    with first.held(), first.held():  # re-entrant within a process
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.2)
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]


def test_without_a_lock_file_the_lock_still_works(tmp_path: Path) -> None:
    lock = HostLock(tmp_path / "missing-dir" / "ring.lock")
    with lock.held():
        pass
