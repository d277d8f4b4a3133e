"""Destruction that falls due is carried out only by daemons allowed to administer keys
(``server.key_admin = true``); a build-agent daemon leaves the version in the token,
unusable, until one of them does."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from hsmsign.admin import KeyAdmin
from hsmsign.client import Client
from hsmsign.errors import RemoteError
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.harness.daemons import running_daemon
from tests.harness.tokens import token_with_keys, write_config

KEYRING = (
    "[keyring]\nmin_destruction_delay_hours = 0\ndev_unsafe_allow_short_destruction_delay = true\n"
    "refresh_seconds = 0.3\n"
)
DIGEST = hashlib.sha256(b"bundle").digest()
V1 = "hsmsign:doomed:v1"


def _signs(client: Client, ref: str) -> int | str:
    try:
        return client.sign_digest(ref, DIGEST).key.version
    except RemoteError as e:
        return e.status_name


def test_only_an_admin_daemon_destroys_what_is_due(tmp_path: Path) -> None:
    token, admin_cfg = token_with_keys(tmp_path, extra=KEYRING)
    agent_cfg = write_config(
        tmp_path / "agent.toml", token, extra=KEYRING + "[server]\nkey_admin = false\n"
    )
    with running_daemon(admin_cfg, tmp_path / "admin1") as d, Client(d.address) as c:
        admin = KeyAdmin(c)
        admin.create_key("doomed")
        admin.rotate_key("doomed", True)
        fingerprint = admin.get_key("doomed").versions[0].fingerprint
        key = admin.schedule_destruction("doomed", 1, 4)
        due = time.monotonic() + 4
        assert key.versions[0].state == pb.KEY_VERSION_STATE_DESTRUCTION_SCHEDULED
    assert V1 in token.labels()

    with running_daemon(agent_cfg, tmp_path / "agent") as agent, Client(agent.address) as c:
        # Past the destruction's time; the agent re-reads the ring every 0.3 s meanwhile.
        time.sleep(max(0.0, due - time.monotonic()) + 1.5)
        assert _signs(c, "doomed") == 2
        assert V1 in token.labels(), "a daemon with key_admin = false destroyed a key version"
        assert _signs(c, "doomed@1") == "FAILED_PRECONDITION"
        assert _signs(c, f"sha256:{fingerprint}") == "FAILED_PRECONDITION"

        with running_daemon(admin_cfg, tmp_path / "admin2") as d, Client(d.address) as ac:
            deadline = time.monotonic() + 15
            while V1 in token.labels():
                assert time.monotonic() < deadline, "the admin daemon did not destroy it"
                time.sleep(0.3)
            state = KeyAdmin(ac).get_key("doomed").versions[0].state
            assert state == pb.KEY_VERSION_STATE_DESTROYED
        assert _signs(c, "doomed@1") == "FAILED_PRECONDITION"
        assert _signs(c, "doomed") == 2
