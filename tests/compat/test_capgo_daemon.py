"""Capgo bundles sealed by the HSM through a real daemon, checked by the real Capgo CLI.

The Capgo calls are CKM_RSA_PKCS over raw bytes, so these tests also pin the strict input
lengths and the RSA-2048 requirement.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import capgo
from hsmsign.capgo.daemon import DaemonSealer
from hsmsign.client import Client, seal_bundle, seal_session_key, sign_checksums
from hsmsign.errors import RemoteError
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.conftest import Daemon, hsmsignd
from tests.harness.capgo_cli import CapgoCli, make_project
from tests.harness.daemons import running_daemon
from tests.harness.filekey import FileKeySealer
from tests.harness.tokens import token_with_keys


def _web_build(root: Path, files: int = 5) -> Path:
    www = root / "www"
    (www / "assets").mkdir(parents=True)
    (www / "index.html").write_text("<!doctype html><title>app</title>")
    for i in range(files):
        (www / "assets" / f"chunk{i}.js").write_bytes(os.urandom(3000 + 997 * i))
    return www


def _bundle(tmp: Path) -> Path:
    z = tmp / "bundle.zip"
    capgo.make_bundle_zip(_web_build(tmp), z)
    return z


def test_seal_bundle_verifies_like_the_device(client: Client, tmp_path: Path) -> None:
    z = _bundle(tmp_path)
    pub = client.public_key("demo").pkcs1_pem
    for fmt in capgo.ChecksumFormat:
        sealer = DaemonSealer(client, "demo")
        out = tmp_path / f"enc-{fmt.value}.zip"
        sealed = capgo.seal_bundle(z, out, sealer, fmt)
        assert sealed.key_id == client.public_key("demo").key.capgo_key_id
        r = capgo.verify_bundle(
            out,
            pub,
            sealed.iv_session_key,
            sealed.signed_checksum,
            plain_out=tmp_path / f"plain-{fmt.value}.zip",
        )
        assert r.checksum_hex == hashlib.sha256(z.read_bytes()).hexdigest()
        assert (tmp_path / f"plain-{fmt.value}.zip").read_bytes() == z.read_bytes()
        assert len(sealed.signed_checksum) == (512 if fmt is capgo.ChecksumFormat.V3 else 344)


def test_one_call_seal_bundle_matches_the_separate_calls(client: Client) -> None:
    key, iv = os.urandom(16), os.urandom(16)
    digest = hashlib.sha256(b"zip").digest()
    both = seal_bundle(client, "demo", key, iv, digest, "v3")
    assert both.key.name == "demo" and both.key.capgo_key_id
    sealed = seal_session_key(client, "demo", key).signature
    assert both.iv_session_key == capgo.format_iv_session_key(iv, sealed)
    _, signed = sign_checksums(client, "demo", [digest], "v3")
    assert both.signed_checksum == signed[0]
    pub = capgo.load_capgo_public_key(client.public_key("demo").pkcs1_pem)
    assert capgo.rsa_public_decrypt(pub, sealed) == key


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        (
            pb.SealSessionKeyRequest(key=pb.KeyRef(name="demo"), session_key=b"\x00" * 15),
            "session_key is 15 bytes; it must be exactly 16",
        ),
        (
            pb.SealSessionKeyRequest(key=pb.KeyRef(name="demo"), session_key=b"\x00" * 32),
            "session_key is 32 bytes",
        ),
        (
            pb.SignChecksumRequest(
                key=pb.KeyRef(name="demo"),
                checksum_sha256=b"\x00" * 48,
                format=pb.CHECKSUM_FORMAT_V2,
            ),
            "checksum_sha256 is 48 bytes",
        ),
        (
            pb.SealBundleRequest(
                key=pb.KeyRef(name="demo"),
                session_key=b"k" * 16,
                iv=b"i" * 15,
                checksum_sha256=b"c" * 32,
            ),
            "iv is 15 bytes",
        ),
        (pb.SignChecksumsRequest(key=pb.KeyRef(name="demo")), "0 checksums"),
        (
            pb.SignChecksumsRequest(
                key=pb.KeyRef(name="demo"), checksums_sha256=[b"c" * 32, b"c" * 31]
            ),
            "checksums_sha256[1]",
        ),
    ],
)
def test_capgo_inputs_are_checked_strictly(client: Client, request_: object, words: str) -> None:
    methods: dict[type, Callable[[Any], object]] = {
        pb.SealSessionKeyRequest: client.signer.SealSessionKey,
        pb.SignChecksumRequest: client.signer.SignChecksum,
        pb.SealBundleRequest: client.signer.SealBundle,
        pb.SignChecksumsRequest: client.signer.SignChecksums,
    }
    method = methods[type(request_)]
    with pytest.raises(RemoteError) as e:
        client.call(lambda: method(request_))
    assert e.value.status_name == "INVALID_ARGUMENT"
    assert words in e.value.message


def test_capgo_call_on_rsa3072_is_refused(client: Client) -> None:
    with pytest.raises(RemoteError) as e:
        seal_session_key(client, "big", os.urandom(16))
    assert e.value.status_name == "FAILED_PRECONDITION"
    assert "RSA-3072" in e.value.message and "requires RSA-2048" in e.value.message


def test_delta_batch_signs_every_file(client: Client, tmp_path: Path) -> None:
    www = _web_build(tmp_path, files=40)
    sealer = DaemonSealer(client, "demo")
    session = capgo.open_session(sealer)
    delta = capgo.encrypt_delta(www, tmp_path / "files", sealer, capgo.ChecksumFormat.V3, session)
    assert len(delta.entries) == 41
    pub = client.public_key("demo").pkcs1_pem
    for entry in delta.entries:
        capgo.verify_delta_file(entry.encrypted_path, pub, session.iv_session_key, entry.file_hash)


def test_hsmsign_bundle_cli_output_is_accepted_by_capgo_cli(
    daemon: Daemon,
    capgo_cli: CapgoCli,
    tmp_path: Path,
) -> None:
    www = _web_build(tmp_path)
    daemon.hsmsign("bundle", "zip", str(www), "-o", str(tmp_path / "b.zip"))
    out = json.loads(
        daemon.hsmsign(
            "bundle", "encrypt", str(tmp_path / "b.zip"), "--key", "demo", "--json"
        ).stdout
    )
    enc = Path(out["encrypted_bundle"])
    assert enc == tmp_path / "b_encrypted.zip" and enc.exists()
    assert len(out["iv_session_key"]) == 369 and len(out["signed_checksum"]) == 512
    assert f'--iv-session-key "{out["iv_session_key"]}"' in out["upload_command"]
    pub = tmp_path / "pub.pem"
    daemon.hsmsign("pubkey", "demo", "--format", "capgo", "-o", str(pub))
    project = make_project(tmp_path / "proj")
    r = capgo_cli.run(
        [
            "bundle",
            "decrypt",
            str(enc),
            out["iv_session_key"],
            "--key",
            str(pub),
            "--checksum",
            out["signed_checksum"],
        ],
        project,
    )
    assert "Checksum matches" in r.stdout + r.stderr
    # the release manager's own check agrees
    ok = daemon.hsmsign(
        "bundle",
        "verify",
        str(enc),
        "--public-key",
        str(pub),
        "--iv-session-key",
        out["iv_session_key"],
        "--checksum",
        out["signed_checksum"],
        "--plain",
        str(tmp_path / "b.zip"),
    )
    assert b"bundle OK" in ok.stdout


def test_capgo_cli_bundle_is_accepted_by_hsmsign_verify(
    daemon: Daemon,
    capgo_cli: CapgoCli,
    tmp_path: Path,
) -> None:
    project = make_project(tmp_path / "proj")
    capgo_cli.run(["key", "create", "--force"], project)
    z = _bundle(tmp_path)
    checksum = hashlib.sha256(z.read_bytes()).hexdigest()
    res = capgo_cli.json(["bundle", "encrypt", str(z), checksum], project)
    enc = next(tmp_path.glob("*encrypted*.zip"), None) or Path(res.get("filename", ""))
    pub = project / ".capgo_key_v2.pub"
    verify = [
        "bundle",
        "verify",
        str(enc),
        "--public-key",
        str(pub),
        "--iv-session-key",
        res["ivSessionKey"],
        "--checksum",
        res["checksum"],
    ]
    r = daemon.hsmsign(*verify)
    assert b"bundle OK" in r.stdout
    # a flipped byte in the encrypted zip is caught and named
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 1
    enc.write_bytes(bytes(data))
    bad = daemon.hsmsign(*verify, check=False)
    assert bad.returncode == 3 and b"checksum" in bad.stderr.lower()


def test_imported_capgo_key_gives_the_cli_bytes(
    capgo_cli: CapgoCli,
    tmp_path: Path,
) -> None:
    """A .capgo_key_v2 imported into the token seals and signs byte-for-byte like the file."""
    project = make_project(tmp_path / "proj")
    capgo_cli.run(["key", "create", "--force"], project)
    key_file = project / ".capgo_key_v2"
    _token, cfg = token_with_keys(tmp_path)
    hsmsignd(cfg, "keys", "import", "--name", "app", str(key_file))
    with running_daemon(cfg, tmp_path / "d") as d, Client(d.address) as c:
        file_sealer = FileKeySealer.from_file(key_file)
        hsm = DaemonSealer(c, "app")
        assert hsm.fetch_public_pem().strip() == file_sealer.public_pem.strip()
        session_key = os.urandom(16)
        digest = hashlib.sha256(b"bundle bytes").digest()
        assert hsm.seal_session_key(session_key) == file_sealer.seal_session_key(session_key)
        for fmt in capgo.ChecksumFormat:
            assert hsm.sign_checksum(digest, fmt) == file_sealer.sign_checksum(digest, fmt)
        pub = serialization.load_pem_public_key((project / ".capgo_key_v2.pub").read_bytes())
        assert isinstance(pub, rsa.RSAPublicKey)
        assert c.public_key("app").key.capgo_key_id == capgo.key_id(
            (project / ".capgo_key_v2.pub").read_text()
        )


def test_capacitor_config_gets_the_public_key(daemon: Daemon, tmp_path: Path) -> None:
    cfg = tmp_path / "capacitor.config.json"
    cfg.write_text(json.dumps({"appId": "com.x", "plugins": {"SplashScreen": {"a": 1}}}, indent=2))
    daemon.hsmsign("pubkey", "demo", "--capacitor-config", str(cfg))
    data = json.loads(cfg.read_text())
    assert data["appId"] == "com.x" and data["plugins"]["SplashScreen"] == {"a": 1}
    assert data["plugins"]["CapacitorUpdater"]["publicKey"].startswith(
        "-----BEGIN RSA PUBLIC KEY-----"
    )
    bad = daemon.hsmsign("pubkey", "big", "--capacitor-config", str(cfg), check=False)
    assert bad.returncode != 0 and b"requires RSA-2048" in bad.stderr


def test_bundle_zip_refuses_a_build_without_index(daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "app.js").write_text("x")
    r = daemon.hsmsign("bundle", "zip", str(tmp_path / "www"), check=False)
    assert r.returncode == 2 and b"index.html" in r.stderr and b"Traceback" not in r.stderr
    assert not (tmp_path / "www.zip").exists()


def test_encrypt_failure_leaves_no_output(daemon: Daemon, tmp_path: Path) -> None:
    z = _bundle(tmp_path)
    r = daemon.hsmsign(
        "bundle", "encrypt", str(z), "--key", "big", "-o", str(tmp_path / "out.zip"), check=False
    )
    assert r.returncode != 0 and b"RSA-2048" in r.stderr
    assert not (tmp_path / "out.zip").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    not_zip = tmp_path / "not.zip"
    not_zip.write_text("hello")
    r = daemon.hsmsign("bundle", "encrypt", str(not_zip), "--key", "demo", check=False)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    assert zipfile.is_zipfile(z)


def test_encrypt_delta_cli(daemon: Daemon, tmp_path: Path) -> None:
    www = _web_build(tmp_path, files=12)
    # a large, compressible file: stored brotli-compressed as NAME.br, as the Capgo CLI does
    (www / "assets" / "big.css").write_text("body { color: red; }\n" * 2000)
    args = [
        "bundle",
        "encrypt-delta",
        str(www),
        "--key",
        "demo",
        "-o",
        str(tmp_path / "rel"),
        "--plugin-version",
        "7.2.0",
        "--json",
    ]
    out = json.loads(daemon.hsmsign(*args).stdout)
    assert out["file_count"] == 14 and out["checksum_format"] == "v2"
    assert out["brotli_files"] == 1
    manifest = json.loads((tmp_path / "rel" / "manifest.json").read_text())
    assert len(manifest) == 14
    assert "assets/big.css.br" in {e["file_name"] for e in manifest}
    pub = daemon.hsmsign("pubkey", "demo", "--format", "pkcs1").stdout.decode()
    for entry in manifest:
        plain = capgo.verify_delta_file(
            tmp_path / "rel" / "files" / entry["file_name"],
            pub,
            out["iv_session_key"],
            entry["file_hash"],
            decompress=brotli.decompress,
        )
        assert plain == (www / entry["file_name"].removesuffix(".br")).read_bytes()
    r = capgo.verify_bundle(
        Path(out["encrypted_bundle"]), pub, out["iv_session_key"], out["signed_checksum"]
    )
    assert r.checksum_format is capgo.ChecksumFormat.V2
    # --disable-brotli stores every file as it is; an existing output directory is refused
    args[6] = str(tmp_path / "plain")
    out2 = json.loads(daemon.hsmsign(*args, "--disable-brotli").stdout)
    assert out2["brotli_files"] == 0
    again = daemon.hsmsign(*args, check=False)
    assert again.returncode == 2 and b"already exists" in again.stderr
    args[6] = str(tmp_path / "old")
    args[8] = "6.24.9"
    old = daemon.hsmsign(*args, check=False)
    assert old.returncode == 2 and b"does not apply delta updates" in old.stderr
    assert not (tmp_path / "old").exists()


def test_verify_refuses_a_signed_bundle_that_would_not_install(
    client: Client, daemon: Daemon, tmp_path: Path
) -> None:
    """Correctly sealed and signed, but the plain payload is no zip: the device would fail to
    unzip it, so the release manager's check fails too, naming why."""
    not_a_zip = tmp_path / "notes.txt"
    not_a_zip.write_bytes(os.urandom(5000))
    sealer = DaemonSealer(client, "demo")
    session = capgo.open_session(sealer)
    enc = tmp_path / "enc.zip"
    digest = capgo.encrypt_bundle(not_a_zip, enc, session.session_key, session.iv)
    signed = capgo.encode_signed_checksum(
        sealer.sign_checksum(digest, capgo.ChecksumFormat.V3), capgo.ChecksumFormat.V3
    )
    pub = tmp_path / "pub.pem"
    pub.write_text(client.public_key("demo").pkcs1_pem)
    r = daemon.hsmsign(
        "bundle",
        "verify",
        str(enc),
        "--public-key",
        str(pub),
        "--iv-session-key",
        session.iv_session_key,
        "--checksum",
        signed,
        check=False,
    )
    assert r.returncode == 3 and b"not a zip the device can unzip" in r.stderr
