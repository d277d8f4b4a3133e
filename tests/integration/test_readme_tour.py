"""The README's five-minute tour, command by command, against the shipped dev config
(hsm_config/dev.toml, unchanged) on a dev token made the way `make run` makes it
(softhsm/dev-token.sh, then `hsmsignd keys ensure demo`), in a directory of the test's own:
only the listen address differs (a port of the test's, never the default one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from tests.harness import HSMSIGN, HSMSIGND, REPO
from tests.harness.daemons import start_daemon


def _run(cwd: Path, env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(command)}: exit {r.returncode}\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr
    return r


def test_the_readme_tour_works_on_the_shipped_dev_config(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "hsm_config").mkdir(parents=True)
    config = root / "hsm_config" / "dev.toml"
    shutil.copy(REPO / "hsm_config" / "dev.toml", config)
    env = {k: v for k, v in os.environ.items() if k != "HSMSIGN_SERVER"}
    # What `make dev-token` does.
    _run(root, env, str(REPO / "softhsm" / "dev-token.sh"), str(root / "softhsm" / "dev"))
    _run(root, env, HSMSIGND, "--config", str(config), "keys", "ensure", "demo",
         "--purpose", "sign", "--algorithm", "rsa-2048")  # fmt: skip
    d = start_daemon(config, tmp_path / "d")
    try:
        d.wait_log("keys: demo v1 sha256:")
        shell = tmp_path / "shell"
        shell.mkdir()
        env["HSMSIGN_SERVER"] = d.address
        assert "BEGIN PUBLIC KEY" in _run(shell, env, HSMSIGN, "pubkey", "demo").stdout
        _run(shell, env, HSMSIGN, "pubkey", "demo", "-o", "pub.pem")
        (shell / "release.tar.gz").write_text("release 1.2.3\n")
        _run(shell, env, HSMSIGN, "sign", "--key", "demo", "--file", "release.tar.gz", "-o", "sig")
        verified = _run(shell, env, "openssl", "dgst", "-sha256", "-verify", "pub.pem",
                        "-signature", "sig", "release.tar.gz")  # fmt: skip
        assert "Verified OK" in verified.stdout
        _run(shell, env, HSMSIGN, "verify", "--key", "demo", "--file", "release.tar.gz",
             "--signature", "sig")  # fmt: skip
        pss = _run(shell, env, HSMSIGN, "sign", "--key", "demo", "--file", "release.tar.gz",
                   "--algorithm", "rsa-pss-sha256", "--json")  # fmt: skip
        assert json.loads(pss.stdout)["version"] == 1
        audit = root / "softhsm" / "dev" / "audit"
        shown = _run(shell, env, HSMSIGN, "audit", "show", str(audit), "--key", "demo")
        assert "SignDigest" in shown.stdout
        shutil.copy(audit / "audit-key.pem", shell / "audit-key.pem")
    finally:
        assert d.stop() == 0
    _run(shell, env, HSMSIGN, "audit", "verify", str(audit), "--public-key", "audit-key.pem")
