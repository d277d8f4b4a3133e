"""Which gRPC targets the CLI counts as this machine (plaintext allowed without --insecure)."""

from __future__ import annotations

import pytest

from hsmsign._internal.plaintext import is_local

CASES = [
    ("127.0.0.1:50051", True),
    ("127.1.2.3:1", True),
    ("localhost:50051", True),
    ("LOCALHOST:1", True),
    ("api.localhost:1", True),
    ("[::1]:50051", True),
    ("0.0.0.0:1", True),
    ("[::]:1", True),
    ("unix:/run/hsmsign/admin.sock", True),
    ("unix-abstract:hsmsign", True),
    ("dns:///localhost:50051", True),
    ("ipv4:127.0.0.1:50051", True),
    ("ipv6:[::1]:50051", True),
    ("10.0.0.7:50051", False),
    ("192.168.1.2:1", False),
    ("[2001:db8::1]:50051", False),
    ("hsm.internal:50051", False),
    ("dns:///hsm.internal:50051", False),
    ("localhost.evil.example:1", False),
    ("127.0.0.1.nip.io:1", False),
    # several replicas (hsmsign.connection): local only if every address is
    ("127.0.0.1:1,127.0.0.2:2", True),
    ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
    ("ipv6:[::1]:1,[::1]:2", True),
    ("[::1]:1,[::1]:2", True),
    ("127.0.0.1:1,10.0.0.7:2", False),
    ("ipv4:127.0.0.1:1,10.0.0.7:2", False),
    ("ipv6:[::1]:1,[2001:db8::1]:2", False),
    ("dns://127.0.0.1:53/localhost:1", True),
    ("dns://127.0.0.1:53/hsm.internal:1", False),
]


@pytest.mark.parametrize(("target", "local"), CASES, ids=[c[0] for c in CASES])
def test_local_targets(target: str, local: bool) -> None:
    assert is_local(target) is local
