"""Counts the key ring's object scans across its background checks (tests/integration/
test_keyring_check.py). Usage: python keyring_check_scans.py CONFIG HSMSIGND; prints JSON."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from server import config as cfgmod
from server.keyring import ring as kr
from server.pkcs11.session import Session
from server.pkcs11.token import Token


def main() -> None:
    config, hsmsignd = sys.argv[1], sys.argv[2]
    cfg = cfgmod.load(Path(config))
    ring = kr.KeyRing(Token(cfg.token), cfg)
    scans = [0]
    real_scan = Session.find_key_objects

    def counted(self: Session, *args: Any, **kwargs: Any) -> Any:
        scans[0] += 1
        return real_scan(self, *args, **kwargs)

    setattr(Session, "find_key_objects", counted)  # noqa: B010  (counted, not replaced)
    out: dict[str, object] = {}

    def names() -> list[str]:
        return sorted(k.name for k in ring.list_keys())

    def keys(*action: str) -> None:
        subprocess.run(
            [hsmsignd, "--config", config, "keys", *action], check=True, capture_output=True
        )

    for _ in range(3):
        ring._check()
    out["quiet"] = scans[0]
    # A change made in another process: the offline ceremony writes a new state generation.
    keys("create", "fresh")
    ring._check()
    out["after_change"], out["names"] = scans[0], names()
    ring._check()
    out["settled"] = scans[0]
    ring._snapshot.scanned_at -= kr.FULL_SCAN_SECONDS
    ring._check()
    out["backstop"] = scans[0]
    # A destruction that falls due with no further change to the state: read and carried out.
    keys("rotate", "fresh")
    keys("schedule-destroy", "fresh", "1", "--delay", "2s")
    ring._check()  # the state changed: one scan; v1 is not due yet
    out["scheduled"] = scans[0]
    time.sleep(2.5)
    ring._check()  # due: the objects are read and v1's are destroyed
    out["due"] = scans[0]
    versions = ring.get("fresh").versions
    out["v1_objects"] = [v.info.can_sign for v in versions if v.version == 1]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
