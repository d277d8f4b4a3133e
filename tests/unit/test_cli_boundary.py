"""The ``hsmsign`` console script reports bad input in one line, never a traceback.

These run the real console script (no daemon: each case fails, or succeeds, before any
call to one would be made).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import keyformats
from hsmsign.capgo.bundle import encrypt_bundle, new_session_material
from hsmsign.capgo.format import ChecksumFormat, encode_signed_checksum, format_iv_session_key
from hsmsign.errors import EXIT_USAGE
from tests.harness.filekey import FileKeySealer

HSMSIGN = str(Path(sys.executable).parent / "hsmsign")
NO_DAEMON = "127.0.0.1:9"  # never reached: every case here fails (or ends) before a call


def hsmsign(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [HSMSIGN, "--server", NO_DAEMON, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hsmsign: error: "), r.stderr
    assert r.returncode == code, r.stderr
    for w in words:
        assert w in lines[0]


@pytest.fixture()
def www(tmp_path: Path) -> Path:
    web = tmp_path / "www"
    (web / "js").mkdir(parents=True)
    (web / "index.html").write_text("<html>hi</html>")
    (web / "js" / "app.js").write_text("console.log(1)")
    return web


@pytest.fixture(scope="module")
def sealer() -> FileKeySealer:
    return FileKeySealer(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _encrypted(tmp: Path, sealer: FileKeySealer) -> tuple[Path, Path, str, str]:
    """An encrypted bundle, its public key file, ivSessionKey and signed checksum."""
    plain = tmp / "b.zip"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("index.html", "<html>x</html>")
    key, iv = new_session_material()
    enc = tmp / "b.enc"
    digest = encrypt_bundle(plain, enc, key, iv)
    ivsk = format_iv_session_key(iv, sealer.seal_session_key(key))
    signed = encode_signed_checksum(
        sealer.sign_checksum(digest, ChecksumFormat.V3), ChecksumFormat.V3
    )
    pem = tmp / "pub.pem"
    pem.write_text(keyformats.pkcs1_pem(sealer.public_key))
    return enc, pem, ivsk, signed


def test_zip_into_a_missing_folder(www: Path) -> None:
    r = hsmsign("bundle", "zip", str(www), "-o", "/nonexistent/x.zip")
    assert_one_line_error(r, EXIT_USAGE, "/nonexistent")


def test_zip_of_the_current_folder(www: Path) -> None:
    r = hsmsign("bundle", "zip", ".", cwd=www)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert zipfile.ZipFile(www.parent / "www.zip").namelist() == ["index.html", "js/app.js"]


def test_verify_of_a_missing_file(tmp_path: Path, sealer: FileKeySealer) -> None:
    _enc, pem, ivsk, signed = _encrypted(tmp_path, sealer)
    r = hsmsign(
        "bundle", "verify", str(tmp_path / "missing.enc"), "--public-key", str(pem),
        "--iv-session-key", ivsk, "--checksum", signed,
    )  # fmt: skip
    assert_one_line_error(r, EXIT_USAGE, "missing.enc")


def test_decrypt_into_a_missing_folder(tmp_path: Path, sealer: FileKeySealer) -> None:
    enc, pem, ivsk, signed = _encrypted(tmp_path, sealer)
    r = hsmsign(
        "bundle", "decrypt", str(enc), "--public-key", str(pem), "--iv-session-key", ivsk,
        "--checksum", signed, "-o", str(tmp_path / "missing" / "plain.zip"),
    )  # fmt: skip
    assert_one_line_error(r, EXIT_USAGE, "missing")


def test_decrypt_failure_keeps_the_previous_output(tmp_path: Path, sealer: FileKeySealer) -> None:
    enc, pem, ivsk, signed = _encrypted(tmp_path, sealer)
    out = tmp_path / "plain.zip"
    out.write_bytes(b"the previous good output")
    tampered = tmp_path / "tampered.enc"
    data = bytearray(enc.read_bytes())
    data[0] ^= 1
    tampered.write_bytes(bytes(data))
    r = hsmsign(
        "bundle", "decrypt", str(tampered), "--public-key", str(pem), "--iv-session-key", ivsk,
        "--checksum", signed, "-o", str(out),
    )  # fmt: skip
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert out.read_bytes() == b"the previous good output"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["b.zip", "b.enc", "pub.pem", "plain.zip", "tampered.enc"]
    )


def test_an_os_error_is_one_line(www: Path, tmp_path: Path) -> None:
    """An OSError no check foresaw (here: the output is a folder) still gives one line."""
    (tmp_path / "taken").mkdir()
    r = hsmsign("bundle", "zip", str(www), "-o", str(tmp_path / "taken"))
    assert_one_line_error(r, 1, "taken")
    assert list((tmp_path / "taken").iterdir()) == []


def test_keys_usage_errors_exit_2_before_any_call() -> None:
    r = hsmsign("keys", "disable", "demo", "0")
    assert_one_line_error(r, EXIT_USAGE, "version must be 1 or more")
    r = hsmsign("keys", "schedule-destroy", "demo", "2", "--delay", "soon")
    assert_one_line_error(r, EXIT_USAGE, "bad duration")


@pytest.mark.parametrize("value", ["0", "65", "four"])
def test_a_bad_connections_count_is_a_usage_error_before_any_call(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the flag or from HSMSIGN_CONNECTIONS (argparse's usage error, as --timeout's)."""
    for args in (("--connections", value, "pubkey", "demo"), ("pubkey", "demo")):
        if args[0] == "pubkey":
            monkeypatch.setenv("HSMSIGN_CONNECTIONS", value)
        r = hsmsign(*args)
        assert r.returncode == EXIT_USAGE, r
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith("hsmsign: error: argument --connections: "), r.stderr
        assert "whole number from 1 to 64" in last, r.stderr
        assert "Traceback" not in r.stderr
