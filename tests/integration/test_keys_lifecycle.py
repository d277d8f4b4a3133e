"""Key lifecycle through a real daemon on its own SoftHSM2 token: rotation (table-driven),
states, provenance, purposes, destruction in the token, and the offline `hsmsignd keys` path.

These tests mutate keys, so they never touch the shared session token.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hsmsign.admin import KeyAdmin
from hsmsign.client import Client
from hsmsign.errors import RemoteError
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.conftest import Daemon, TokenDir, hsmsignd
from tests.harness.daemons import running_daemon
from tests.harness.tokens import token_with_keys

KEYRING = (
    "[keyring]\nmin_destruction_delay_hours = 0\ndev_unsafe_allow_short_destruction_delay = true\n"
    "refresh_seconds = 0.5\n"
)
DIGEST = hashlib.sha256(b"bundle").digest()


@dataclass
class Env:
    token: TokenDir
    config: Path
    daemon: Daemon
    client: Client
    admin: KeyAdmin = field(init=False)

    def __post_init__(self) -> None:
        self.admin = KeyAdmin(self.client)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("lifecycle")
    t, config = token_with_keys(tmp, extra=KEYRING)
    with running_daemon(config, tmp / "daemon") as d, Client(d.address) as c:
        yield Env(t, config, d, c)


def _signed_version(client: Client, ref: str) -> int | str:
    """The version that signs for ``ref``, or the error status name."""
    try:
        return client.sign_digest(ref, DIGEST).key.version
    except RemoteError as e:
        return e.status_name


# (case id, operations, expected {reference: version or status}, expected states)
# Operations: ("rotate", make_primary) or (action, version) or (action, version, expected error).
ROTATIONS = [
    ("fresh", [], {"K": 1, "K@1": 1, "K@2": "NOT_FOUND"}, {1: "enabled"}),
    (
        "rotate-primary",
        [("rotate", True)],
        {"K": 2, "K@1": 1, "K@2": 2},
        {1: "enabled", 2: "enabled"},
    ),
    ("rotate-staged", [("rotate", False)], {"K": 1, "K@2": 2}, {1: "enabled", 2: "enabled"}),
    ("roll-back", [("rotate", True), ("set_primary", 1)], {"K": 1, "K@2": 2}, {}),
    (
        "disable-old",
        [("rotate", True), ("disable", 1)],
        {"K": 2, "K@1": "FAILED_PRECONDITION"},
        {1: "disabled", 2: "enabled"},
    ),
    ("disable-primary-refused", [("disable", 1, "FAILED_PRECONDITION")], {"K": 1}, {1: "enabled"}),
    (
        "re-enable",
        [("rotate", True), ("disable", 1), ("enable", 1)],
        {"K": 2, "K@1": 1},
        {1: "enabled"},
    ),
    (
        "primary-must-be-enabled",
        [("rotate", False), ("disable", 2), ("set_primary", 2, "FAILED_PRECONDITION")],
        {"K": 1, "K@2": "FAILED_PRECONDITION"},
        {2: "disabled"},
    ),
    (
        "schedule-then-cancel",
        [("rotate", True), ("schedule", 1), ("cancel", 1)],
        {"K": 2, "K@1": "FAILED_PRECONDITION"},
        {1: "disabled"},
    ),
    (
        "scheduled-is-unusable",
        [("rotate", True), ("schedule", 1), ("enable", 1, "FAILED_PRECONDITION")],
        {"K": 2, "K@1": "FAILED_PRECONDITION"},
        {1: "destruction-scheduled"},
    ),
    (
        "destroyed",
        [("rotate", True), ("destroy", 1), ("enable", 1, "FAILED_PRECONDITION")],
        {"K": 2, "K@1": "FAILED_PRECONDITION", "K@3": "NOT_FOUND"},
        {1: "destroyed", 2: "enabled"},
    ),
    (
        "schedule-primary-refused",
        [("schedule", 1, "FAILED_PRECONDITION")],
        {"K": 1},
        {1: "enabled"},
    ),
    ("unknown-version", [("disable", 9, "NOT_FOUND")], {"K@9": "NOT_FOUND"}, {}),
]


@pytest.mark.parametrize(
    ("case", "ops", "expected", "states"), ROTATIONS, ids=[r[0] for r in ROTATIONS]
)
def test_rotation_table(
    env: Env,
    case: str,
    ops: list[tuple[object, ...]],
    expected: dict[str, int | str],
    states: dict[int, str],
) -> None:
    name = f"rot-{case}"
    env.admin.create_key(name)
    for op in ops:
        action, arg = op[0], op[1]
        want_error = op[2] if len(op) > 2 else None
        try:
            if action == "rotate":
                env.admin.rotate_key(name, bool(arg))
            elif action == "set_primary":
                env.admin.set_primary(name, int(arg))  # type: ignore[call-overload]
            elif action == "disable":
                env.admin.disable(name, int(arg))  # type: ignore[call-overload]
            elif action == "enable":
                env.admin.enable(name, int(arg))  # type: ignore[call-overload]
            elif action == "schedule":
                env.admin.schedule_destruction(name, int(arg), 3600)  # type: ignore[call-overload]
            elif action == "destroy":
                env.admin.schedule_destruction(name, int(arg), 0)  # type: ignore[call-overload]
            elif action == "cancel":
                env.admin.cancel_destruction(name, int(arg))  # type: ignore[call-overload]
        except RemoteError as e:
            assert e.status_name == want_error, f"{op}: {e}"
            if e.status_name == "FAILED_PRECONDITION":
                assert f"version {arg}" in e.message
        else:
            assert want_error is None, f"{op} should fail with {want_error}"
    for ref, want in expected.items():
        assert _signed_version(env.client, ref.replace("K", name)) == want, ref
    key = env.admin.get_key(name)
    by_version = {v.version: pb.KeyVersionState.Name(v.state) for v in key.versions}
    for version, state in states.items():
        assert by_version[version] == "KEY_VERSION_STATE_" + state.upper().replace("-", "_")


def test_refusal_names_the_version(env: Env) -> None:
    env.admin.create_key("named")
    env.admin.rotate_key("named", True)
    env.admin.disable("named", 1)
    with pytest.raises(RemoteError) as e:
        env.client.sign_digest("named@1", DIGEST)
    assert e.value.status_name == "FAILED_PRECONDITION"
    assert "'named' version 1 is disabled" in e.value.message


def test_old_version_by_fingerprint_and_key_id(env: Env) -> None:
    """A build for an app that embeds the old public key signs with the old version."""
    key = env.admin.create_key("app-old")
    v1 = key.versions[0]
    env.admin.rotate_key("app-old", True)
    assert env.client.sign_digest(f"sha256:{v1.fingerprint}", DIGEST).key.version == 1
    assert env.client.sign_digest(f"keyid:{v1.capgo_key_id}", DIGEST).key.version == 1
    assert env.client.sign_digest("app-old", DIGEST).key.version == 2


def test_provenance_of_generated_key(env: Env) -> None:
    key = env.admin.create_key("prov", "sign", "rsa-3072")
    assert key.algorithm == pb.KEY_ALGORITHM_RSA_3072 and key.purpose == pb.KEY_PURPOSE_SIGN
    v = key.versions[0]
    p = v.provenance
    assert (p.local, p.never_extractable, p.always_sensitive, p.sensitive) == (True,) * 4
    assert not p.extractable and not p.imported
    assert v.HasField("created_at") and v.primary and key.primary_version == 1
    assert v.pkcs1_pem.startswith("-----BEGIN RSA PUBLIC KEY-----")
    access = env.token.object("Private Key", "hsmsign:prov:v1").access
    assert {"never extractable", "always sensitive", "local"} <= access


def test_purposes_are_exclusive(env: Env) -> None:
    env.admin.create_key("wrapper", "unwrap")
    private = {o.label: o for o in env.token.objects("Private Key")}
    usage = private["hsmsign:wrapper:v1"].usage
    assert "sign" not in usage and "decrypt" in usage
    with pytest.raises(RemoteError) as e:
        env.client.sign_digest("wrapper", DIGEST)
    assert e.value.status_name == "FAILED_PRECONDITION" and "unwrap key" in e.value.message
    assert "decrypt" not in private["hsmsign:prov:v1"].usage


def test_bad_arguments(env: Env) -> None:
    cases: tuple[tuple[Callable[[], object], str], ...] = (
        (lambda: env.admin.create_key("bad name!"), "INVALID_ARGUMENT"),
        (lambda: env.admin.get_key("no-such-key"), "NOT_FOUND"),
        (lambda: env.admin.rotate_key("no-such-key"), "NOT_FOUND"),
        (lambda: env.admin.disable("no-such-key", 1), "NOT_FOUND"),
    )
    for call, status in cases:
        with pytest.raises(RemoteError) as e:
            call()
        assert e.value.status_name == status
    env.admin.create_key("dup")
    with pytest.raises(RemoteError) as e:
        env.admin.create_key("dup")
    assert e.value.status_name == "FAILED_PRECONDITION"
    raw = pb.CreateKeyRequest(name="x", purpose=pb.KEY_PURPOSE_SIGN, algorithm=99)  # type: ignore[arg-type]
    with pytest.raises(RemoteError) as e:
        env.client.call(lambda: env.client.admin.CreateKey(raw))
    assert e.value.status_name == "INVALID_ARGUMENT"


def _labels(token: TokenDir) -> set[str]:
    return token.labels()


def test_destruction_removes_the_objects(env: Env) -> None:
    env.admin.create_key("gone")
    env.admin.rotate_key("gone", True)
    assert "hsmsign:gone:v1" in _labels(env.token)
    r = env.daemon.hsmsign("keys", "schedule-destroy", "gone", "1", "--delay", "0s", "--json")
    out = json.loads(r.stdout)
    assert out["versions"][0]["state"] == "destroyed"
    listing = _labels(env.token)
    assert "hsmsign:gone:v1" not in listing and "hsmsign:gone:v2" in listing
    # Still listed (with its public key), refused for use.
    listed = json.loads(env.daemon.hsmsign("keys", "list", "--json").stdout)
    v1 = next(v for v in listed if v["name"] == "gone" and v["version"] == 1)
    assert v1["state"] == "destroyed"
    assert _signed_version(env.client, "gone@1") == "FAILED_PRECONDITION"


def test_scheduled_destruction_happens_at_its_time(env: Env) -> None:
    """The daemon's background refresh destroys the objects once destroy_at has passed,
    without any request naming the key."""
    env.admin.create_key("later")
    env.admin.rotate_key("later", True)
    key = env.admin.schedule_destruction("later", 1, 2)
    assert key.versions[0].state == pb.KEY_VERSION_STATE_DESTRUCTION_SCHEDULED
    assert "hsmsign:later:v1" in _labels(env.token)
    deadline = time.monotonic() + 15
    while "hsmsign:later:v1" in _labels(env.token):
        assert time.monotonic() < deadline, "scheduled destruction did not happen"
        time.sleep(0.5)
    # the daemon's view follows within its refresh interval
    while env.admin.get_key("later").versions[0].state != pb.KEY_VERSION_STATE_DESTROYED:
        assert time.monotonic() < deadline + 5, "the ring never reported the version destroyed"
        time.sleep(0.2)


def test_minimum_destruction_delay_is_enforced(client: Client) -> None:
    """The shared daemon keeps the default 24 h minimum; nothing changes on refusal."""
    with pytest.raises(RemoteError) as e:
        KeyAdmin(client).schedule_destruction("demo", 1, 3600)
    assert e.value.status_name == "INVALID_ARGUMENT"
    assert "delay 1 hour is below this daemon's minimum of 24 hours" in e.value.message


def test_rotate_cli_prints_public_key_formats(env: Env) -> None:
    env.daemon.hsmsign("keys", "create", "cli-key")
    out = env.daemon.hsmsign("keys", "rotate", "cli-key").stdout.decode()
    assert "rotated cli-key v2" in out
    assert "-----BEGIN PUBLIC KEY-----" in out and "-----BEGIN RSA PUBLIC KEY-----" in out
    assert "Capgo key_id: MIIBCgKCAQEA" in out
    table = env.daemon.hsmsign("keys", "list").stdout.decode()
    assert "cli-key" in table and "*v2" in table
    r = env.daemon.hsmsign("keys", "disable", "cli-key", "2", check=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and "set another primary first" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_offline_ceremony_is_seen_by_the_running_daemon(env: Env) -> None:
    """`hsmsignd keys` works straight on the token, and the daemon picks the change up."""
    hsmsignd(env.config, "keys", "create", "offline")
    r = hsmsignd(env.config, "keys", "rotate", "offline", "--json")
    assert json.loads(r.stdout)["version"] == 2
    deadline = time.monotonic() + 10
    while _signed_version(env.client, "offline") != 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    hsmsignd(env.config, "keys", "schedule-destroy", "offline", "1", "--delay", "0s")
    assert "hsmsign:offline:v1" not in _labels(env.token)
    listed = json.loads(hsmsignd(env.config, "keys", "list", "--json").stdout)
    assert [v["state"] for v in listed if v["name"] == "offline"] == ["destroyed", "enabled"]
