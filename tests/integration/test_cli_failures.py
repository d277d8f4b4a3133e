"""Failures of the CLIs against a real daemon and token: one line, the documented exit code,
and an output file that survives untouched."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hsmsign.errors import EXIT_ERROR, EXIT_USAGE
from tests.conftest import Daemon, hsmsignd, make_token, write_config

HSMSIGND = str(Path(sys.executable).parent / "hsmsignd")
PREVIOUS = b"the previous good release"


def assert_one_line_error(
    r: subprocess.CompletedProcess[bytes], code: int, prog: str = "hsmsign"
) -> str:
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert r.returncode == code, err
    return lines[0]


@pytest.fixture()
def bundle_zip(tmp_path: Path) -> Path:
    z = tmp_path / "b.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("index.html", "<html>x</html>")
        f.writestr("js/app.js", "x" * 5000)
    return z


@pytest.fixture()
def web(tmp_path: Path) -> Path:
    w = tmp_path / "www"
    w.mkdir()
    (w / "index.html").write_text("<html>x</html>")
    (w / "app.js").write_text("y" * 3000)
    return w


@pytest.mark.parametrize(
    "command",
    [
        ["bundle", "encrypt", "{zip}", "--key", "demo", "-o", "{missing}/enc.zip"],
        ["sign", "--key", "demo", "--file", "{zip}", "-o", "{missing}/sig.bin"],
        ["pubkey", "demo", "-o", "{missing}/pub.pem"],
        ["pubkey", "demo", "--capacitor-config", "{missing}/capacitor.config.json"],
    ],
    ids=["encrypt", "sign", "pubkey", "capacitor-config"],
)
def test_output_into_a_missing_folder(
    daemon: Daemon, tmp_path: Path, bundle_zip: Path, command: list[str]
) -> None:
    args = [a.format(zip=bundle_zip, missing=tmp_path / "missing") for a in command]
    assert_one_line_error(daemon.hsmsign(*args, check=False), EXIT_USAGE)


@pytest.fixture(scope="module")
def disabled_ref(daemon: Daemon) -> str:
    """A key version that exists and is disabled: the daemon refuses to sign with it."""
    daemon.hsmsign("keys", "create", "h1-retired")
    daemon.hsmsign("keys", "rotate", "h1-retired")
    daemon.hsmsign("keys", "disable", "h1-retired", "1")
    return "h1-retired@1"


@pytest.mark.parametrize("key", ["big", "disabled"])
def test_failed_encrypt_keeps_the_previous_output(
    daemon: Daemon, tmp_path: Path, bundle_zip: Path, disabled_ref: str, key: str
) -> None:
    out = tmp_path / "b_encrypted.zip"
    out.write_bytes(PREVIOUS)
    ref = disabled_ref if key == "disabled" else key
    r = daemon.hsmsign("bundle", "encrypt", str(bundle_zip), "--key", ref, check=False)
    assert_one_line_error(r, EXIT_ERROR)
    assert out.read_bytes() == PREVIOUS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zip", "b_encrypted.zip"]


@pytest.mark.parametrize("key", ["big", "disabled"])
def test_failed_encrypt_delta_leaves_nothing(
    daemon: Daemon, tmp_path: Path, web: Path, disabled_ref: str, key: str
) -> None:
    ref = disabled_ref if key == "disabled" else key
    out = tmp_path / "release"
    r = daemon.hsmsign(
        "bundle", "encrypt-delta", str(web), "--key", ref, "-o", str(out), check=False
    )
    assert_one_line_error(r, EXIT_ERROR)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www"]
    # A previous release in that folder is never touched.
    out.mkdir()
    (out / "manifest.json").write_bytes(PREVIOUS)
    r = daemon.hsmsign(
        "bundle", "encrypt-delta", str(web), "--key", ref, "-o", str(out), check=False
    )
    assert_one_line_error(r, EXIT_USAGE)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert (out / "manifest.json").read_bytes() == PREVIOUS


def test_a_good_encrypt_makes_one_call_and_uses_the_daemons_key_id(
    daemon: Daemon, tmp_path: Path, bundle_zip: Path
) -> None:
    out = json.loads(
        daemon.hsmsign("bundle", "encrypt", str(bundle_zip), "--key", "demo", "--json").stdout
    )
    pub = json.loads(daemon.hsmsign("pubkey", "demo", "--format", "json").stdout)
    assert out["key_id"] == pub["capgo_key_id"] and out["key_version"] == pub["version"]
    assert out["fingerprint"] == pub["fingerprint"]


# -- hsmsignd keys ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unreachable_token_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose token cannot be opened (no token has its label): any command that
    touches the token fails; argument errors must be found first."""
    t = make_token(tmp_path_factory.mktemp("h1-token"))
    t.label = "no-such-token"
    return write_config(t.path / "hsmsignd.toml", t)


@pytest.mark.parametrize(
    "args",
    [
        ["keys", "disable", "demo", "0"],
        ["keys", "schedule-destroy", "demo", "2", "--delay", "soon"],
        ["keys", "import", "--name", "x", "/nonexistent/key.pem"],
    ],
    ids=["version-0", "bad-delay", "missing-key-file"],
)
def test_hsmsignd_keys_checks_arguments_before_the_token(
    unreachable_token_config: Path, args: list[str]
) -> None:
    r = hsmsignd(unreachable_token_config, *args, check=False)
    line = assert_one_line_error(
        subprocess.CompletedProcess(r.args, r.returncode, b"", r.stderr.encode()),
        EXIT_USAGE,
        "hsmsignd",
    )
    assert "token" not in line


def test_both_keys_commands_print_the_same(daemon: Daemon, config: Path) -> None:
    for args in (["list"], ["list", "--json"], ["get", "demo"], ["get", "demo", "--json"]):
        online = daemon.hsmsign("keys", *args).stdout.decode()
        offline = hsmsignd(config, "keys", *args).stdout
        assert online == offline, args


@pytest.mark.parametrize("prog", ["hsmsign", "hsmsignd"])
def test_keys_list_into_a_closed_pipe(daemon: Daemon, config: Path, prog: str) -> None:
    """``keys list | head`` where the reader has gone: no traceback."""
    exe = str(Path(sys.executable).parent / prog)
    argv = (
        [exe, "--server", daemon.address] if prog == "hsmsign" else [exe, "--config", str(config)]
    )
    p = subprocess.Popen([*argv, "keys", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before the table is written
    err = p.stderr.read().decode(errors="replace")
    p.wait(timeout=120)
    assert "Traceback" not in err and "Exception ignored" not in err, err
