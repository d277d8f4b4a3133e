"""The test harness does what the suite relies on: one parser of pkcs11-tool listings, test
daemons never on the default port, a guard that catches the default port's use, and test
lanes that each hold tests (pytest exits 5 on an empty lane)."""

from __future__ import annotations

import re
import socket
import time

import pytest

from tests.harness import DEFAULT_PORT, REPO, DefaultPortGuard, parse_objects
from tests.harness.daemons import _with_listen

LISTING = """\
Data object 2
  label:          'hsmsign:keyring'
  application:    'hsmsign'
  flags:           modifiable private
Private Key Object; RSA\x20
  label:      hsmsign:demo:v1
  ID:         90c70e75
  Usage:      sign
  Access:     sensitive, always sensitive, never extractable, local
Public Key Object; RSA 2048 bits
  label:      hsmsign:demo:v1
  Usage:      verify
  Access:     local
Secret Key Object; unknown key algorithm 43
  label:      hsmsign:implicit-rejection
  Usage:      sign
  Access:     sensitive, always sensitive, never extractable, local
"""


def test_pkcs11_tool_listing_is_parsed_by_object() -> None:
    objects = parse_objects(LISTING)
    assert [(o.kind, o.label) for o in objects] == [
        ("Data", "hsmsign:keyring"),
        ("Private Key", "hsmsign:demo:v1"),
        ("Public Key", "hsmsign:demo:v1"),
        ("Secret Key", "hsmsign:implicit-rejection"),
    ]
    private = objects[1]
    assert private.detail == "RSA" and private.usage == {"sign"}
    assert private.access == {"sensitive", "always sensitive", "never extractable", "local"}
    # "extractable" is a word of its own, not a part of "never extractable".
    assert "extractable" not in private.access
    assert objects[2].detail == "RSA 2048 bits" and objects[2].access == {"local"}


def test_a_field_before_any_object_is_refused() -> None:
    with pytest.raises(ValueError, match="before any object"):
        parse_objects("  label:      orphan\n")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), ("serve", "--listen", "127.0.0.1:0")),
        (("serve",), ("serve", "--listen", "127.0.0.1:0")),
        (("serve", "--worker", "x"), ("serve", "--listen", "127.0.0.1:0", "--worker", "x")),
        (("serve", "--listen", "10.0.0.1:9"), ("serve", "--listen", "10.0.0.1:9")),
        (("keys", "list"), ("keys", "list")),
    ],
)
def test_a_serving_hsmsignd_always_gets_a_port(
    args: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert _with_listen(args) == expected


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_the_port_guard_blocks_servers_and_counts_clients() -> None:
    port = _free_port()  # the real guard holds 50051 for this whole run
    with DefaultPortGuard(port) as guard:
        assert guard.held
        with socket.socket() as server, pytest.raises(OSError):
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            server.bind(("127.0.0.1", port))
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        deadline = time.monotonic() + 5
        while not guard.connections and time.monotonic() < deadline:
            time.sleep(0.05)
    assert guard.connections == 1


def test_the_session_guard_holds_the_default_port(
    default_port_guard: DefaultPortGuard,
) -> None:
    with socket.socket() as s, pytest.raises(OSError):
        s.bind(("127.0.0.1", DEFAULT_PORT))
    assert default_port_guard.port == DEFAULT_PORT


@pytest.mark.parametrize("lane", ["unit", "integration", "compat"])
def test_every_lane_has_tests_and_a_make_target(lane: str) -> None:
    assert sorted((REPO / "tests" / lane).glob("test_*.py")), f"tests/{lane} has no tests"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^test-{lane}:.*\n\t\$\(BIN\)/pytest -q tests/{lane}$", makefile, re.M)
