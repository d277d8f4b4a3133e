"""The key ring's background check (server.keyring.KeyRing._check): it reads only the state
document while nothing changed, and reads the key objects again when the state changed, when
a destruction falls due, and at least every FULL_SCAN_SECONDS. Run in a subprocess on its own
token, with the real token objects; the object scans are counted, not replaced."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import HSMSIGND, REPO, hsmsignd, make_token, write_config

SCRIPT = textwrap.dedent("""
    import json, subprocess, sys, time
    from pathlib import Path
    from server import config as cfgmod, keyring as kr
    from server.token import Session, Token

    config, hsmsignd = sys.argv[1], sys.argv[2]
    cfg = cfgmod.load(Path(config))
    ring = kr.KeyRing(Token(cfg.token), cfg)
    scans = [0]
    real_scan = Session.find_key_objects

    def counted(self, *args, **kwargs):
        scans[0] += 1
        return real_scan(self, *args, **kwargs)

    Session.find_key_objects = counted
    out = {}
    names = lambda: sorted(k.name for k in ring.list_keys())
    for _ in range(3):
        ring._check()
    out["quiet"] = scans[0]
    # A change made in another process: the offline ceremony writes a new state generation.
    subprocess.run([hsmsignd, "--config", config, "keys", "create", "fresh"], check=True,
                   capture_output=True)
    ring._check()
    out["after_change"], out["names"] = scans[0], names()
    ring._check()
    out["settled"] = scans[0]
    ring._snapshot.scanned_at -= kr.FULL_SCAN_SECONDS
    ring._check()
    out["backstop"] = scans[0]
    # A destruction that falls due with no further change to the state: read and carried out.
    for action in (["rotate", "fresh"], ["schedule-destroy", "fresh", "1", "--delay", "2s"]):
        subprocess.run([hsmsignd, "--config", config, "keys", *action], check=True,
                       capture_output=True)
    ring._check()  # the state changed: one scan; v1 is not due yet
    out["scheduled"] = scans[0]
    time.sleep(2.5)
    ring._check()  # due: the objects are read and v1's are destroyed
    out["due"] = scans[0]
    versions = ring.get("fresh").versions
    out["v1_objects"] = [v.info.can_sign for v in versions if v.version == 1]
    print(json.dumps(out))
""")


def test_check_reads_key_objects_only_when_needed(tmp_path: Path) -> None:
    token = make_token(tmp_path / "token")
    config = write_config(
        tmp_path / "hsmsignd.toml",
        token,
        extra="[keyring]\nmin_destruction_delay_hours = 0\nrefresh_seconds = 3600\n",
    )
    hsmsignd(config, "keys", "create", "demo")
    script = tmp_path / "check.py"
    script.write_text(SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script), str(config), HSMSIGND],
        cwd=REPO,
        env={**token.env(), "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["quiet"] == 0  # nothing changed: the state document only
    assert out["after_change"] == 1 and out["names"] == ["demo", "fresh"]
    assert out["settled"] == 1
    assert out["backstop"] == 2
    assert out["scheduled"] == 3
    assert out["due"] >= 4 and out["v1_objects"] in ([], [False])
