"""The policy as a table: (identity, operation, key) -> allowed; the gate's RPC table
covers every RPC of the API; the per-identity limits."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from hsmsign.v1 import hsmsign_pb2 as pb
from server.identity.model import Identity
from server.policy.gate import RPCS
from server.policy.limits import Limiter, LimitExceeded
from server.policy.model import ALL_OPERATIONS, Grant, Limit, Operation, Policy

Op = Operation


def _oidc(**claims: str) -> Identity:
    return Identity("oidc", "github", "repo:acme/app", "https://ci", MappingProxyType(claims))


RELEASE = _oidc(repository="acme/app", ref="refs/heads/main")
FEATURE = _oidc(repository="acme/app", ref="refs/heads/feature")
OTHER_REPO = _oidc(repository="acme/other", ref="refs/heads/main")
SECURITY = Identity("mtls", "security", "subject_cn security-team", "CN=clients")
AGENT = Identity("mtls", "agent", "dns_san agent.example.org", "CN=clients")
LOCAL = Identity("local", "local", "ipv4:127.0.0.1:5000")

POLICY = Policy(
    grants=(
        Grant(
            ("github",),
            ("release-*",),
            frozenset({Op.SIGN_DIGEST, Op.GET_PUBLIC_KEY}),
            MappingProxyType({"repository": "acme/app", "ref": "refs/heads/main"}),
        ),
        Grant(("agent",), ("capgo",), frozenset({Op.SEAL_SESSION_KEY, Op.SIGN_CHECKSUM})),
        Grant(("agent",), ("archive-*",), frozenset({Op.UNWRAP})),
        Grant(("security",), ("*",), ALL_OPERATIONS - {Op.UNWRAP}),
        Grant(("*",), ("public-*",), frozenset({Op.GET_PUBLIC_KEY})),
    )
)

TABLE = [
    (RELEASE, Op.SIGN_DIGEST, "release-2026", True),
    (RELEASE, Op.GET_PUBLIC_KEY, "release-2026", True),
    (RELEASE, Op.SIGN_CHECKSUM, "release-2026", False),  # raw Capgo ops are separate rights
    (RELEASE, Op.SIGN_DIGEST, "capgo", False),
    (FEATURE, Op.SIGN_DIGEST, "release-2026", False),  # a claim does not match
    (OTHER_REPO, Op.SIGN_DIGEST, "release-2026", False),
    (AGENT, Op.SEAL_SESSION_KEY, "capgo", True),
    (AGENT, Op.SIGN_CHECKSUM, "capgo", True),
    (AGENT, Op.SIGN_DIGEST, "capgo", False),
    (AGENT, Op.UNWRAP, "archive-2025", True),
    (AGENT, Op.REWRAP, "archive-2025", False),
    (AGENT, Op.IMPORT, "capgo", False),
    (SECURITY, Op.IMPORT, "anything", True),
    (SECURITY, Op.SET_PRIMARY, "release-2026", True),
    (SECURITY, Op.UNWRAP, "archive-2025", False),
    (LOCAL, Op.GET_PUBLIC_KEY, "public-web", True),  # "*" is any identity
    (LOCAL, Op.GET_PUBLIC_KEY, "release-2026", False),
    (LOCAL, Op.SIGN_DIGEST, "public-web", False),
    (SECURITY, Op.SIGN_DIGEST, "Release-2026", True),
    (RELEASE, Op.SIGN_DIGEST, "Release-2026", False),  # globs are case-sensitive
]


@pytest.mark.parametrize(("identity", "operation", "key", "allowed"), TABLE)
def test_policy_table(identity: Identity, operation: Operation, key: str, allowed: bool) -> None:
    assert POLICY.allows(identity, operation, key) is allowed


def test_no_policy_grants_nothing() -> None:
    for op in Operation:
        assert not Policy().allows(LOCAL, op, "demo")
        assert not Policy().allows_some_key(SECURITY, op)


def test_a_grant_with_claims_never_matches_a_certificate_identity() -> None:
    grant = Grant(("*",), ("*",), ALL_OPERATIONS, MappingProxyType({"ref": "*"}))
    assert not grant.admits(SECURITY) and grant.admits(RELEASE)


def test_every_rpc_of_the_api_has_its_rights() -> None:
    methods = {
        m.name
        for service in ("Signer", "KeyAdmin")
        for m in pb.DESCRIPTOR.services_by_name[service].methods
    }
    assert methods == set(RPCS)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_with_burst_refuses_at_once_with_a_retry_hint() -> None:
    clock = Clock()
    limiter = Limiter(Policy(limits=MappingProxyType({"agent": Limit(rate=2, burst=3)})), clock)
    for _ in range(3):
        with limiter.admit(AGENT):
            pass
    with pytest.raises(LimitExceeded) as e, limiter.admit(AGENT):
        pass
    assert e.value.retry_after_ms == 500 and "retry in 500 ms" in str(e.value)
    with limiter.admit(SECURITY):  # another identity has its own (here: no) limit
        pass
    clock.now += 0.5
    with limiter.admit(AGENT):
        pass


def test_concurrency_cap_per_identity() -> None:
    limiter = Limiter(Policy(default_limit=Limit(concurrent=2)), Clock())
    with limiter.admit(AGENT), limiter.admit(AGENT):
        with pytest.raises(LimitExceeded) as e, limiter.admit(AGENT):
            pass
        assert e.value.retry_after_ms > 0
        with limiter.admit(SECURITY):
            pass
    with limiter.admit(AGENT):  # slots come back when calls end
        pass


def test_a_reloaded_policy_keeps_what_callers_have_used_of_their_limits() -> None:
    # SIGHUP builds a new limiter from the new policy: a caller over its rate, or holding
    # its concurrent slots, must not get a fresh allowance by it.
    clock = Clock()
    policy = Policy(limits=MappingProxyType({"agent": Limit(rate=1, burst=1, concurrent=1)}))
    before = Limiter(policy, clock)
    with before.admit(AGENT):
        after = Limiter(policy, clock, previous=before)
        with pytest.raises(LimitExceeded), after.admit(AGENT):  # its one slot is still held
            pass
    with pytest.raises(LimitExceeded), after.admit(AGENT):  # and its rate is spent
        pass
    clock.now += 1.0
    with after.admit(AGENT):
        pass


def test_a_lower_burst_after_reload_caps_what_was_saved_up() -> None:
    clock = Clock()
    before = Limiter(Policy(limits=MappingProxyType({"agent": Limit(rate=1, burst=5)})), clock)
    with before.admit(AGENT):
        pass
    after = Limiter(
        Policy(limits=MappingProxyType({"agent": Limit(rate=1, burst=1)})), clock, previous=before
    )
    with after.admit(AGENT):
        pass
    with pytest.raises(LimitExceeded), after.admit(AGENT):
        pass


def test_the_admin_socket_takes_exactly_the_key_admin_methods() -> None:
    # The gate tells KeyAdmin calls by method name: the names must not repeat across services.
    from hsmsign.v1 import hsmsign_pb2 as pb
    from server.policy.gate import KEY_ADMIN_METHODS

    signer = {m.name for m in pb.DESCRIPTOR.services_by_name["Signer"].methods}
    assert KEY_ADMIN_METHODS and not KEY_ADMIN_METHODS & signer
    assert "ListKeys" in KEY_ADMIN_METHODS and "SignDigest" in signer
