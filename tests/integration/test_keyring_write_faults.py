"""Token faults during a key-ring write (issue 16), injected over the real SoftHSM2 token
(tests/harness/faults.py) into a real daemon, seen through a real channel with no retries.

A key-ring write is a compare-and-swap over the state document (docs/adr/0007): each attempt
carries a write id, so a retry after a fault first reads whether the faulted attempt landed.
Such a write is therefore retried on the recovered token, and never applied twice. Before,
the first fault ended the call with UNAVAILABLE. In clean-clone CI, a rotation whose module
had lost sight of the state document answered "the token is recovering; retry" after 10 s.

Each test has its own token and a refresh interval longer than the test: no background read
re-initialises the module for the write.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.harness.daemons import Daemon, start_daemon
from tests.harness.faults import fired, launcher, write_plan
from tests.harness.tokens import TokenDir, token_with_keys

KEY = "demo"
STATE_LABEL = "hsmsign:keyring"


@pytest.fixture()
def setup(tmp_path: Path) -> Iterator[tuple[TokenDir, Path, Daemon]]:
    token, config = token_with_keys(
        tmp_path / "t",
        [KEY],
        label="hsmsign-write-faults",
        extra="[server]\nprocesses = 1\n[keyring]\nrefresh_seconds = 600\n",
    )
    plan = tmp_path / "plan.json"
    write_plan(plan)
    d = start_daemon(config, tmp_path / "daemon", command=launcher(plan))
    yield token, plan, d
    d.stop()


def _versions(stub: pb_grpc.KeyAdminStub) -> list[int]:
    key = stub.GetKey(pb.GetKeyRequest(name=KEY), timeout=30)
    return sorted(v.version for v in key.versions)


def _rotate_through(setup: tuple[TokenDir, Path, Daemon], *faults: dict[str, object]) -> None:
    """Rotates once under ``faults``: the call succeeds, adds exactly one version, which
    every read lists, and one state document is left in the token."""
    token, plan, d = setup
    with grpc.insecure_channel(d.address) as ch:  # no service config: no client retries
        stub = pb_grpc.KeyAdminStub(ch)
        before = _versions(stub)
        write_plan(plan, *faults)
        try:
            rotated = stub.RotateKey(pb.RotateKeyRequest(name=KEY), timeout=90)
        except grpc.RpcError as e:
            pytest.fail(f"rotate under {list(faults)}: {e.code().name}: {e.details()}")
        write_plan(plan)
        assert fired(plan), "the fault never fired: the test proves nothing"
        new = sorted(v.version for v in rotated.versions)
        assert new == [*before, max(before) + 1], (before, new)
        assert _versions(stub) == new
    documents = [o for o in token.objects("Data") if o.label == STATE_LABEL]
    assert len(documents) == 1, documents
    assert "Traceback" not in d.log()


@pytest.mark.parametrize("error", ["DeviceError", "GeneralError", "SessionHandleInvalid"])
def test_a_fault_before_the_state_write_is_retried_on_the_recovered_token(
    setup: tuple[TokenDir, Path, Daemon], error: str
) -> None:
    _rotate_through(setup, {"call": "create_object", "error": error, "times": 1})


def test_a_state_write_whose_answer_was_lost_counts_once(
    setup: tuple[TokenDir, Path, Daemon],
) -> None:
    """The token stored the new state document, then failed: the retry finds it by its write
    id and takes it as done; it writes no second generation (no second version)."""
    _rotate_through(
        setup, {"call": "create_object", "error": "DeviceError", "after": True, "times": 1}
    )


def test_a_module_that_lost_sight_of_the_state_is_re_initialised_for_the_write(
    setup: tuple[TokenDir, Path, Daemon],
) -> None:
    """What SoftHSM2 does after a read raced another process's write (design fact 9): every
    scan misses the state document until the module is re-initialised."""
    _rotate_through(setup, {"call": "find_objects", "result": "empty", "until": "initialize"})
    setup[2].wait_log("re-initialising the token first")
