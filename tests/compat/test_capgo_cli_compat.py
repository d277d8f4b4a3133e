"""The published Capgo CLI (@capgo/cli 8.68.1) as a real peer of hsmsign.capgo.

Keys come from ``key create``; bundles sealed here must pass ``bundle decrypt --checksum``,
bundles from ``bundle encrypt`` must pass verify_bundle, and with the CLI's randomness pinned
(a ``node --import`` preload replacing crypto.randomBytes) both sides produce the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from hsmsign import capgo
from hsmsign.capgo import BundleVerificationError, ChecksumFormat
from tests.harness.capgo_cli import CapgoCli, make_project
from tests.harness.filekey import FileKeySealer

UPDATER_FOR = {ChecksumFormat.V3: "8.51.23", ChecksumFormat.V2: "7.27.8"}


class Project:
    def __init__(self, root: Path, cli: CapgoCli, fmt: ChecksumFormat) -> None:
        self.root, self.cli, self.fmt = root, cli, fmt
        make_project(root, UPDATER_FOR[fmt])
        www = root / "www"
        www.mkdir()
        (www / "index.html").write_text("<html><script>CapacitorUpdater.notifyAppReady()</script>")
        (www / "app.js").write_bytes(os.urandom(70000))
        self.zip = root / "bundle.zip"
        capgo.make_bundle_zip(www, self.zip)

    def decrypt(self, enc: Path, ivsk: str, checksum: str) -> tuple[bool, str]:
        proc = self.cli.run(
            [
                "bundle",
                "decrypt",
                str(enc),
                ivsk,
                "--key",
                ".capgo_key_v2.pub",
                "--checksum",
                checksum,
            ],
            self.root,
            check=False,
        )
        out = proc.stdout + proc.stderr
        return proc.returncode == 0 and "Checksum matches" in out, out


@pytest.fixture(scope="module")
def keyed_root(tmp_path_factory: pytest.TempPathFactory, capgo_cli: CapgoCli) -> Path:
    """One CLI-created key pair, shared by the projects below."""
    root = make_project(tmp_path_factory.mktemp("capgo-key"))
    proc = capgo_cli.run(["key", "create"], root, check=False)
    assert (root / ".capgo_key_v2").is_file(), proc.stdout + proc.stderr
    return root


@pytest.fixture(params=[ChecksumFormat.V3, ChecksumFormat.V2], ids=["v3", "v2"])
def project(
    request: pytest.FixtureRequest, tmp_path: Path, capgo_cli: CapgoCli, keyed_root: Path
) -> Project:
    p = Project(tmp_path / "app", capgo_cli, request.param)
    for name in (".capgo_key_v2", ".capgo_key_v2.pub"):
        (p.root / name).write_bytes((keyed_root / name).read_bytes())
    return p


def test_cli_key_is_pkcs1_and_matches_our_encoding(keyed_root: Path) -> None:
    sealer = FileKeySealer.from_file(keyed_root / ".capgo_key_v2")
    pub = (keyed_root / ".capgo_key_v2.pub").read_text()
    assert sealer.public_pem == pub.strip()
    assert capgo.key_id(pub) == sealer.public_pem.splitlines()[1][:20]
    # key create also wrote the key into the project's capacitor.config.json
    cfg = json.loads((keyed_root / "capacitor.config.json").read_text())
    assert cfg["plugins"]["CapacitorUpdater"]["publicKey"].strip() == sealer.public_pem


def test_cli_accepts_bundle_sealed_by_hsmsign(project: Project) -> None:
    sealer = FileKeySealer.from_file(project.root / ".capgo_key_v2")
    enc = project.root / "sealed.enc"
    sb = capgo.seal_bundle(project.zip, enc, sealer, project.fmt)
    ok, out = project.decrypt(enc, sb.iv_session_key, sb.signed_checksum)
    assert ok, out
    assert project.fmt.value.upper() in out  # the CLI checked it as V3 / V2
    decrypted = Path(f"{enc}_decrypted.zip")
    assert decrypted.read_bytes() == project.zip.read_bytes()
    # Negative control: the same bundle with another bundle's signature is refused.
    other = project.root / "other.zip"
    other.write_bytes(project.zip.read_bytes() + b"\0")
    wrong = capgo.encode_signed_checksum(
        sealer.sign_checksum(hashlib.sha256(other.read_bytes()).digest(), project.fmt), project.fmt
    )
    ok, out = project.decrypt(enc, sb.iv_session_key, wrong)
    assert not ok, out


def test_verify_accepts_bundle_encrypted_by_cli(project: Project) -> None:
    checksum = hashlib.sha256(project.zip.read_bytes()).hexdigest()
    j = project.cli.json(["bundle", "encrypt", str(project.zip), checksum], project.root)
    enc = project.root / j["filename"]
    pub = (project.root / ".capgo_key_v2.pub").read_text()
    out = project.root / "plain.zip"
    res = capgo.verify_bundle(enc, pub, j["ivSessionKey"], j["checksum"], out, fmt=project.fmt)
    assert res.checksum_hex == checksum
    assert out.read_bytes() == project.zip.read_bytes()
    with pytest.raises(BundleVerificationError, match="checksum format check failed"):
        other = ChecksumFormat.V2 if project.fmt is ChecksumFormat.V3 else ChecksumFormat.V3
        capgo.verify_bundle(enc, pub, j["ivSessionKey"], j["checksum"], fmt=other)


def test_byte_identical_to_cli_with_pinned_randomness(project: Project) -> None:
    session_key, iv = capgo.new_session_material()
    checksum = hashlib.sha256(project.zip.read_bytes()).hexdigest()
    j = project.cli.json(
        ["bundle", "encrypt", str(project.zip), checksum],
        project.root,
        pin_random=[iv, session_key],
    )
    sealer = FileKeySealer.from_file(project.root / ".capgo_key_v2")
    ours = project.root / "ours.enc"
    digest = capgo.encrypt_bundle(project.zip, ours, session_key, iv)
    assert ours.read_bytes() == (project.root / j["filename"]).read_bytes()
    assert (
        capgo.format_iv_session_key(iv, sealer.seal_session_key(session_key)) == j["ivSessionKey"]
    )
    signed = capgo.encode_signed_checksum(sealer.sign_checksum(digest, project.fmt), project.fmt)
    assert signed == j["checksum"]


def test_cli_bundle_zip_is_accepted(project: Project) -> None:
    j = project.cli.json(
        [
            "bundle",
            "zip",
            "com.example.hsmsign",
            "--path",
            "www",
            "--name",
            "cli.zip",
            "--no-code-check",
        ],
        project.root,
    )
    made = project.root / "cli.zip"
    assert hashlib.sha256(made.read_bytes()).hexdigest() == j["checksum"]
    capgo.check_bundle_zip(made)
