"""Capgo bundle format: vectors, round trips, tampering, atomic files, zip and config helpers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmsign import capgo, keyformats
from hsmsign.capgo import (
    BundleFormatError,
    BundleVerificationError,
    CapacitorConfigError,
    ChecksumFormat,
)
from tests.harness.filekey import FileKeySealer

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "data" / "capgo-crypto-rsa.json").read_text()
)


@pytest.fixture(scope="module")
def sealer() -> FileKeySealer:
    return FileKeySealer(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def other_sealer() -> FileKeySealer:
    return FileKeySealer(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def write_bundle_zip(path: Path, payload: bytes = b"x" * 5000) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("index.html", "<html>hello</html>")
        z.writestr("assets/app.js", payload)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- vectors from capacitor-updater's contract tests ---------------------------------------


@pytest.mark.parametrize("case", VECTORS["rsaPublicDecrypt"], ids=lambda c: c["id"])
def test_vector_public_decrypt(case: dict[str, Any]) -> None:
    pub = capgo.load_capgo_public_key(VECTORS["publicKeyPem"])
    got = capgo.rsa_public_decrypt(pub, bytes.fromhex(case["input"]["ciphertextHex"]))
    assert got.hex() == case["expect"]["plaintextHex"]


@pytest.mark.parametrize("case", VECTORS["decryptChecksum"], ids=lambda c: c["id"])
def test_vector_decrypt_checksum(case: dict[str, Any]) -> None:
    pub = capgo.load_capgo_public_key(VECTORS["publicKeyPem"])
    raw = capgo.decode_signed_checksum(case["input"]["checksumHex"])
    assert capgo.rsa_public_decrypt(pub, raw).hex() == case["expect"]["decryptedHex"]
    # The same signature in V2's base64 text form decodes to the same bytes.
    assert capgo.decode_signed_checksum(base64.b64encode(raw).decode()) == raw


@pytest.mark.parametrize("case", VECTORS["calcKeyId"], ids=lambda c: c["id"])
def test_vector_key_id(case: dict[str, Any]) -> None:
    assert capgo.key_id(case["input"]["publicKeyPem"]) == case["expect"]["keyId"]


@pytest.mark.parametrize("case", VECTORS["rsaPublicKeyLoad"], ids=lambda c: c["id"])
def test_vector_public_key_load(case: dict[str, Any]) -> None:
    pem = case["input"]["publicKeyPem"]
    if case["expect"]["loads"]:
        assert capgo.load_capgo_public_key(pem).key_size == 2048
    else:
        with pytest.raises(BundleFormatError):
            capgo.load_capgo_public_key(pem)


@pytest.mark.parametrize("case", VECTORS["decryptChecksumInvalid"], ids=lambda c: c["id"])
def test_vector_invalid_checksum_throws(case: dict[str, Any]) -> None:
    assert case["expect"]["throws"]
    with pytest.raises(BundleVerificationError, match="expected 256"):
        capgo.decode_signed_checksum(case["input"]["checksumHex"])


# --- keys -----------------------------------------------------------------------------------


def test_spki_and_wrong_size_keys_are_refused(sealer: FileKeySealer) -> None:
    spki = sealer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(BundleFormatError, match="PKCS#1"):
        capgo.load_capgo_public_key(spki)
    big = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    with pytest.raises(BundleFormatError, match="RSA-2048"):
        capgo.load_capgo_public_key(keyformats.pkcs1_pem(big.public_key()))
    with pytest.raises(BundleFormatError, match="RSA-2048"):
        FileKeySealer(big)


def test_pkcs1_pem_round_trip_and_key_id(sealer: FileKeySealer) -> None:
    pem = sealer.public_pem
    assert pem.startswith("-----BEGIN RSA PUBLIC KEY-----\nMIIBCgKCAQEA")
    assert capgo.load_capgo_public_key(pem).public_numbers() == sealer.public_key.public_numbers()
    assert capgo.key_id(pem) == pem.splitlines()[1][:20]


def test_file_key_sealer_is_raw_pkcs1_type1(sealer: FileKeySealer) -> None:
    data = bytes(range(16))
    sig = sealer.seal_session_key(data)
    assert len(sig) == 256
    assert sig == sealer.seal_session_key(data)  # deterministic, as the CLI's privateEncrypt
    # OpenSSL's own PKCS#1 v1.5 recovery with no hash is the independent check.
    assert sealer.public_key.recover_data_from_signature(sig, padding.PKCS1v15(), None) == data
    em = pow(int.from_bytes(sig, "big"), 65537, sealer.public_key.public_numbers().n)
    assert em.to_bytes(256, "big") == b"\x00\x01" + b"\xff" * 237 + b"\x00" + data
    with pytest.raises(BundleFormatError):
        sealer.seal_session_key(b"short")


# --- checksum formats -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "fmt"),
    [
        ("8.51.23", ChecksumFormat.V3),
        ("8.0.0", ChecksumFormat.V3),
        ("9.1.0", ChecksumFormat.V3),
        ("7.30.0", ChecksumFormat.V3),
        ("7.36.1", ChecksumFormat.V3),
        ("7.29.9", ChecksumFormat.V2),
        ("7.27.8", ChecksumFormat.V2),
        ("7.30.0-beta.1", ChecksumFormat.V2),
        ("6.39.0", ChecksumFormat.V3),
        ("6.14.26", ChecksumFormat.V2),
        ("5.45.10", ChecksumFormat.V3),
        ("5.29.0", ChecksumFormat.V2),
        ("v5.30.0", ChecksumFormat.V3),
        ("4.99.0", ChecksumFormat.V2),
    ],
)
def test_checksum_format_for_plugin(version: str, fmt: ChecksumFormat) -> None:
    assert capgo.checksum_format_for_plugin(version) is fmt


@pytest.mark.parametrize("bad", ["", "8", "8.51", "latest", "^8.51.23", "8.51.x"])
def test_checksum_format_for_unparsable_version(bad: str) -> None:
    with pytest.raises(BundleFormatError, match="cannot parse"):
        capgo.checksum_format_for_plugin(bad)


def test_checksum_signing_input_and_encoding() -> None:
    digest = hashlib.sha256(b"bundle").digest()
    assert capgo.checksum_signing_input(digest, ChecksumFormat.V3) == digest
    v2 = capgo.checksum_signing_input(digest, ChecksumFormat.V2)
    assert len(v2) == 48
    assert base64.b64encode(v2).decode() == digest.hex()
    with pytest.raises(BundleFormatError, match="32 bytes"):
        capgo.checksum_signing_input(digest[:31], ChecksumFormat.V3)
    sig = bytes(range(256))
    v3_text = capgo.encode_signed_checksum(sig, ChecksumFormat.V3)
    v2_text = capgo.encode_signed_checksum(sig, ChecksumFormat.V2)
    assert (len(v3_text), len(v2_text)) == (512, 344)
    assert capgo.decode_signed_checksum(v3_text) == sig == capgo.decode_signed_checksum(v2_text)
    with pytest.raises(BundleFormatError):
        capgo.encode_signed_checksum(sig[:255], ChecksumFormat.V3)


# --- ivSessionKey -----------------------------------------------------------------------------


def test_iv_session_key_round_trip(sealer: FileKeySealer) -> None:
    iv, sealed = bytes(16), sealer.seal_session_key(bytes(range(16)))
    s = capgo.format_iv_session_key(iv, sealed)
    assert len(s) == 369
    assert capgo.parse_iv_session_key(s) == (iv, sealed)


@pytest.mark.parametrize(
    "bad",
    [
        "AAAAAAAAAAAAAAAAAAAAAA==",  # one part
        "AAAAAAAAAAAAAAAAAAAAAA==:",  # empty key part
        ":AAAA",  # empty IV part
        "AAAA:BBBB:CCCC",  # three parts
        "AAAAAAAAAAAAAAAAAAAAAA:AAAA",  # unpadded
        "AA*A:AAAA",  # not base64
        "AB==:AAAA",  # non-canonical trailing bits
    ],
)
def test_iv_session_key_parse_is_strict(bad: str) -> None:
    with pytest.raises(BundleFormatError):
        capgo.parse_iv_session_key(bad)


# --- round trip and tampering --------------------------------------------------------------


def test_seal_and_verify_round_trip(tmp_path: Path, sealer: FileKeySealer) -> None:
    src = write_bundle_zip(tmp_path / "b.zip")
    seen: list[tuple[int, int]] = []
    sb = capgo.seal_bundle(
        src, tmp_path / "b.enc", sealer, ChecksumFormat.V3, lambda d, t: seen.append((d, t))
    )
    plain = src.read_bytes()
    assert sb.checksum_hex == hashlib.sha256(plain).hexdigest()
    assert sb.key_id == capgo.key_id(sealer.public_pem)
    assert len(sb.signed_checksum) == 512 and len(sb.iv_session_key) == 369
    assert seen[-1] == (len(plain), len(plain))
    cmd = sb.upload_command("https://cdn.example.com/b.enc")
    assert cmd == (
        "npx @capgo/cli bundle upload --external https://cdn.example.com/b.enc "
        f'--iv-session-key "{sb.iv_session_key}" --encrypted-checksum "{sb.signed_checksum}"'
    )
    out = tmp_path / "plain.zip"
    res = capgo.verify_bundle(
        tmp_path / "b.enc", sealer.public_pem, sb.iv_session_key, sb.signed_checksum, out
    )
    assert out.read_bytes() == plain
    assert (res.checksum_hex, res.checksum_format, res.plain_size) == (
        sb.checksum_hex,
        ChecksumFormat.V3,
        len(plain),
    )


def test_v2_round_trip_and_format_pinning(tmp_path: Path, sealer: FileKeySealer) -> None:
    src = write_bundle_zip(tmp_path / "b.zip")
    sb = capgo.seal_bundle(src, tmp_path / "b.enc", sealer, ChecksumFormat.V2)
    assert len(sb.signed_checksum) == 344
    args = (tmp_path / "b.enc", sealer.public_pem, sb.iv_session_key, sb.signed_checksum)
    assert capgo.verify_bundle(*args).checksum_format is ChecksumFormat.V2
    assert capgo.verify_bundle(*args, fmt=ChecksumFormat.V2).checksum_hex == sb.checksum_hex
    with pytest.raises(BundleVerificationError, match="checksum format check failed"):
        capgo.verify_bundle(*args, fmt=ChecksumFormat.V3)


@pytest.fixture
def two_bundles(tmp_path: Path, sealer: FileKeySealer) -> tuple[capgo.SealedBundle, ...]:
    a = capgo.seal_bundle(
        write_bundle_zip(tmp_path / "a.zip", b"a" * 40000), tmp_path / "a.enc", sealer
    )
    b = capgo.seal_bundle(
        write_bundle_zip(tmp_path / "b.zip", b"b" * 40000), tmp_path / "b.enc", sealer
    )
    return a, b


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _resign_key_part(iv_session_key: str, iv: bytes) -> str:
    _, sealed = capgo.parse_iv_session_key(iv_session_key)
    return capgo.format_iv_session_key(iv, sealed)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("flipped byte", "checksum mismatch"),
        ("flipped last byte", "bad PKCS#7 padding|checksum mismatch"),
        ("truncated", "not a positive multiple of 16"),
        ("wrong public key", "session key check failed"),
        ("signature of another bundle", "checksum mismatch"),
        ("swapped IV", "checksum mismatch"),
        ("short IV", "IV check failed"),
        ("session key of wrong size", "session key check failed: decrypted to 15 bytes"),
        ("checksum signed by another key", "checksum signature check failed"),
        ("checksum not 256 bytes", "expected 256"),
    ],
)
def test_tampering_is_detected(
    tmp_path: Path,
    sealer: FileKeySealer,
    other_sealer: FileKeySealer,
    two_bundles: tuple[capgo.SealedBundle, capgo.SealedBundle],
    case: str,
    message: str,
) -> None:
    a, b = two_bundles
    enc, pem, ivsk, sig = a.path, sealer.public_pem, a.iv_session_key, a.signed_checksum
    if case == "flipped byte":
        _flip(enc, 20000)
    elif case == "flipped last byte":
        _flip(enc, enc.stat().st_size - 1)
    elif case == "truncated":
        enc.write_bytes(enc.read_bytes()[:-5])
    elif case == "wrong public key":
        pem = other_sealer.public_pem
    elif case == "signature of another bundle":
        sig = b.signed_checksum
    elif case == "swapped IV":
        ivsk = _resign_key_part(ivsk, b.session.iv)
    elif case == "short IV":
        ivsk = base64.b64encode(bytes(15)).decode() + ":" + ivsk.split(":")[1]
    elif case == "session key of wrong size":
        ivsk = capgo.format_iv_session_key(a.session.iv, sealer._private_encrypt(bytes(15)))
    elif case == "checksum signed by another key":
        sig = capgo.encode_signed_checksum(
            other_sealer.sign_checksum(bytes.fromhex(a.checksum_hex), ChecksumFormat.V3),
            ChecksumFormat.V3,
        )
    elif case == "checksum not 256 bytes":
        sig = sig[:-2]
    out = tmp_path / "out" / "plain.zip"
    out.parent.mkdir()
    with pytest.raises(BundleVerificationError, match=message):
        capgo.verify_bundle(enc, pem, ivsk, sig, out)
    assert list(out.parent.iterdir()) == []


def test_seal_bundle_refuses_non_bundles(tmp_path: Path, sealer: FileKeySealer) -> None:
    (tmp_path / "notzip").write_bytes(b"hello")
    with pytest.raises(BundleFormatError, match="not a readable zip"):
        capgo.seal_bundle(tmp_path / "notzip", tmp_path / "x.enc", sealer)
    with zipfile.ZipFile(tmp_path / "noindex.zip", "w") as z:
        z.writestr("a/index.html", "x")
        z.writestr("b/other.html", "x")
    with pytest.raises(BundleFormatError, match=r"index\.html"):
        capgo.seal_bundle(tmp_path / "noindex.zip", tmp_path / "x.enc", sealer)
    with zipfile.ZipFile(tmp_path / "nested.zip", "w") as z:
        z.writestr("dist/index.html", "x")
        z.writestr("dist/js/app.js", "x")
    capgo.check_bundle_zip(tmp_path / "nested.zip")
    assert not (tmp_path / "x.enc").exists()


class WrongMechanismSealer(FileKeySealer):
    """A sealer that signs with DigestInfo (CKM_SHA256_RSA_PKCS): the device rejects it."""

    def sign_checksum(self, digest: bytes, fmt: ChecksumFormat) -> bytes:
        return super().sign_checksum(hashlib.sha256(digest).digest(), fmt)


def test_sealer_self_check_catches_wrong_signature(tmp_path: Path, sealer: FileKeySealer) -> None:
    bad = WrongMechanismSealer(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    src = write_bundle_zip(tmp_path / "b.zip")
    with pytest.raises(BundleVerificationError, match="sealer self-check"):
        capgo.seal_bundle(src, tmp_path / "b.enc", bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.zip"]


# --- encrypt_bundle ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, 15, 16, 17, 256 << 10, (1 << 20) - 1, (1 << 20) + 5, 3 << 20]
)
def test_encrypt_bundle_length_and_content(tmp_path: Path, size: int) -> None:
    plain = os.urandom(size)
    src, dst = tmp_path / "p", tmp_path / "c"
    src.write_bytes(plain)
    key, iv = capgo.new_session_material()
    digest = capgo.encrypt_bundle(src, dst, key, iv)
    assert digest == hashlib.sha256(plain).digest()
    enc = dst.read_bytes()
    assert len(enc) == 16 * (size // 16 + 1)
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = dec.update(enc) + dec.finalize()
    assert padded[: len(plain)] == plain and padded[len(plain) :] == bytes([16 - size % 16]) * (
        16 - size % 16
    )


def test_encrypt_bundle_interrupted_leaves_nothing(tmp_path: Path) -> None:
    src = tmp_path / "p"
    src.write_bytes(os.urandom(5 << 20))
    key, iv = capgo.new_session_material()
    calls = []

    def interrupt(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capgo.encrypt_bundle(src, tmp_path / "c", key, iv, interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    # An existing destination survives a failed run untouched.
    (tmp_path / "c").write_bytes(b"previous")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        capgo.encrypt_bundle(src, tmp_path / "c", key, iv, interrupt)
    assert (tmp_path / "c").read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_encrypt_bundle_never_overwrites_src(tmp_path: Path) -> None:
    src = tmp_path / "p"
    src.write_bytes(b"plain")
    key, iv = capgo.new_session_material()
    with pytest.raises(BundleFormatError, match="source"):
        capgo.encrypt_bundle(src, tmp_path / "." / "p", key, iv)
    os.link(src, tmp_path / "hard")
    with pytest.raises(BundleFormatError, match="same file"):
        capgo.encrypt_bundle(src, tmp_path / "hard", key, iv)
    with pytest.raises(BundleFormatError, match="16 bytes"):
        capgo.encrypt_bundle(src, tmp_path / "c", key[:8], iv)
    assert src.read_bytes() == b"plain"


def test_new_session_material_is_fresh() -> None:
    a, b = capgo.new_session_material(), capgo.new_session_material()
    assert len(a[0]) == len(a[1]) == 16 and a != b and a[0] != a[1]


# --- make_bundle_zip ------------------------------------------------------------------------


def _web(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_make_bundle_zip_root_and_deterministic(tmp_path: Path) -> None:
    web = _web(tmp_path / "www", {"index.html": b"<html/>", "js/b.js": b"b", "js/a.js": b"a"})
    sha1 = capgo.make_bundle_zip(web, tmp_path / "1.zip")
    os.utime(web / "js" / "a.js", (1, 1))
    sha2 = capgo.make_bundle_zip(web, tmp_path / "2.zip")
    assert sha1 == sha2 == hashlib.sha256((tmp_path / "1.zip").read_bytes()).hexdigest()
    with zipfile.ZipFile(tmp_path / "1.zip") as z:
        assert z.namelist() == ["index.html", "js/a.js", "js/b.js"]
        assert z.read("js/b.js") == b"b"


def test_make_bundle_zip_single_folder(tmp_path: Path) -> None:
    web = _web(tmp_path / "www", {"dist/index.html": b"<html/>", "dist/app.js": b"x"})
    capgo.make_bundle_zip(web, tmp_path / "b.zip")
    with zipfile.ZipFile(tmp_path / "b.zip") as z:
        assert sorted(z.namelist()) == ["dist/app.js", "dist/index.html"]
    capgo.check_bundle_zip(tmp_path / "b.zip")


@pytest.mark.parametrize(
    "files",
    [
        {"app.js": b"x"},
        {"a/index.html": b"x", "b/index.html": b"x"},
        {"dist/index.html": b"x", "README": b"x"},
        {"dist/sub/index.html": b"x"},
    ],
)
def test_make_bundle_zip_refuses_layouts(tmp_path: Path, files: dict[str, bytes]) -> None:
    web = _web(tmp_path / "www", files)
    with pytest.raises(BundleFormatError, match=r"index\.html"):
        capgo.make_bundle_zip(web, tmp_path / "b.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["www"]


def test_make_bundle_zip_refuses_output_inside_build(tmp_path: Path) -> None:
    web = _web(tmp_path / "www", {"index.html": b"x"})
    with pytest.raises(BundleFormatError, match="must not be inside"):
        capgo.make_bundle_zip(web, web / "b.zip")


# --- capacitor config -------------------------------------------------------------------------


def test_set_capacitor_public_key_preserves_file(tmp_path: Path, sealer: FileKeySealer) -> None:
    cfg = tmp_path / "capacitor.config.json"
    original = {
        "appId": "com.example",
        "webDir": "dist",
        "plugins": {
            "SplashScreen": {"launchShowDuration": 0},
            "CapacitorUpdater": {"autoUpdate": True},
        },
        "server": {"url": "ü"},
    }
    cfg.write_text(json.dumps(original, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    capgo.set_capacitor_public_key(cfg, sealer.public_pem)
    text = cfg.read_text(encoding="utf-8")
    data = json.loads(text)
    assert data["plugins"]["CapacitorUpdater"] == {
        "autoUpdate": True,
        "publicKey": sealer.public_pem,
    }
    assert list(data) == list(original) and list(data["plugins"]) == [
        "SplashScreen",
        "CapacitorUpdater",
    ]
    assert text.startswith('{\n    "appId"') and text.endswith("}\n") and "ü" in text


def test_set_capacitor_public_key_tabs_and_missing_section(
    tmp_path: Path, sealer: FileKeySealer
) -> None:
    cfg = tmp_path / "capacitor.config.json"
    cfg.write_text(json.dumps({"appId": "x"}, indent="\t"))
    capgo.set_capacitor_public_key(cfg, sealer.public_pem)
    text = cfg.read_text()
    assert '\n\t"plugins"' in text and not text.endswith("\n")
    assert json.loads(text)["plugins"]["CapacitorUpdater"]["publicKey"] == sealer.public_pem


def test_set_capacitor_public_key_refusals(tmp_path: Path, sealer: FileKeySealer) -> None:
    ts = tmp_path / "capacitor.config.ts"
    ts.write_text("export default {}")
    with pytest.raises(CapacitorConfigError, match="paste this by hand") as e:
        capgo.set_capacitor_public_key(ts, sealer.public_pem)
    assert json.dumps(sealer.public_pem) in str(e.value)
    bad = tmp_path / "capacitor.config.json"
    bad.write_text("{ not json")
    with pytest.raises(CapacitorConfigError, match="not valid JSON"):
        capgo.set_capacitor_public_key(bad, sealer.public_pem)
    assert bad.read_text() == "{ not json"
    good = tmp_path / "c.json"
    good.write_text("{}")
    spki = sealer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    with pytest.raises(BundleFormatError, match="PKCS#1"):
        capgo.set_capacitor_public_key(good, spki)
    assert good.read_text() == "{}" and leftovers(tmp_path) == []


# --- delta ------------------------------------------------------------------------------------


class CountingSealer:
    """Wraps a real sealer and records how it is called (delta must batch)."""

    def __init__(self, inner: FileKeySealer) -> None:
        self.inner = inner
        self.calls: list[str] = []

    @property
    def public_pem(self) -> str:
        return self.inner.public_pem

    def seal_session_key(self, session_key: bytes) -> bytes:
        self.calls.append("seal")
        return self.inner.seal_session_key(session_key)

    def sign_checksum(self, digest: bytes, fmt: ChecksumFormat) -> bytes:
        self.calls.append("sign")
        return self.inner.sign_checksum(digest, fmt)

    def sign_checksums(self, digests: Sequence[bytes], fmt: ChecksumFormat) -> list[bytes]:
        self.calls.append(f"batch:{len(digests)}")
        return self.inner.sign_checksums(digests, fmt)


@pytest.mark.parametrize("fmt", [ChecksumFormat.V3, ChecksumFormat.V2])
def test_delta_round_trip(tmp_path: Path, sealer: FileKeySealer, fmt: ChecksumFormat) -> None:
    files = {
        "index.html": b"<html>hi</html>",
        "js/app.js": os.urandom(3000),
        "assets/big.css": b"body{color:red}\n" * 2000,
        "empty.txt": b"",
        "node_modules/x/index.js": b"skip",
        ".git/HEAD": b"skip",
    }
    web = _web(tmp_path / "www", files)
    capgo.make_bundle_zip(web, tmp_path / "b.zip")
    counting = CountingSealer(sealer)
    sb = capgo.seal_bundle(tmp_path / "b.zip", tmp_path / "b.enc", counting, fmt)
    res = capgo.encrypt_delta(web, tmp_path / "delta", counting, fmt, sb.session)
    assert counting.calls == ["seal", "sign", "batch:3"]
    assert res.iv_session_key == sb.iv_session_key
    assert [e.file_name for e in res.entries] == ["assets/big.css", "index.html", "js/app.js"]
    manifest = json.loads(res.manifest_json())
    assert manifest == [{"file_name": e.file_name, "file_hash": e.file_hash} for e in res.entries]
    for e in res.entries:
        assert len(e.file_hash) == (512 if fmt is ChecksumFormat.V3 else 344)
        enc = (tmp_path / "delta" / e.file_name).read_bytes()
        # Same key and IV as the full bundle:
        dec = Cipher(algorithms.AES(sb.session.session_key), modes.CBC(sb.session.iv)).decryptor()
        padded = dec.update(enc) + dec.finalize()
        plain = padded[: -padded[-1]]
        assert plain == files[e.file_name]
        assert (
            capgo.verify_delta_file(
                e.encrypted_path, sealer.public_pem, sb.iv_session_key, e.file_hash
            )
            == plain
        )
    # A file_hash of another file fails the device's check.
    a, b = res.entries[0], res.entries[1]
    with pytest.raises(BundleVerificationError, match="checksum mismatch"):
        capgo.verify_delta_file(a.encrypted_path, sealer.public_pem, sb.iv_session_key, b.file_hash)


def test_delta_compression_threshold(tmp_path: Path, sealer: FileKeySealer) -> None:
    # zlib stands in for brotli (not in the stdlib): this checks which files get ".br".
    files = {"index.html": b"a" * 100, "big.js": b"b" * 9000, "random.bin": os.urandom(9000)}
    web = _web(tmp_path / "www", files)
    session = capgo.open_session(sealer)
    res = capgo.encrypt_delta(
        web, tmp_path / "d", sealer, ChecksumFormat.V3, session, compress=zlib.compress
    )
    assert sorted(e.file_name for e in res.entries) == ["big.js.br", "index.html", "random.bin"]
    br = next(e for e in res.entries if e.compressed)
    assert (
        capgo.verify_delta_file(
            br.encrypted_path,
            sealer.public_pem,
            session.iv_session_key,
            br.file_hash,
            zlib.decompress,
        )
        == files["big.js"]
    )


def test_delta_refusals(tmp_path: Path, sealer: FileKeySealer) -> None:
    session = capgo.open_session(sealer)
    web = _web(tmp_path / "www", {"index.html": b"x", "my file.js": b"y"})
    with pytest.raises(BundleFormatError, match="spaces"):
        capgo.encrypt_delta(web, tmp_path / "d", sealer, ChecksumFormat.V3, session)
    assert not (tmp_path / "d").exists()
    (web / "my file.js").unlink()
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleFormatError, match="already exists"):
        capgo.encrypt_delta(web, tmp_path / "exists", sealer, ChecksumFormat.V3, session)
    with pytest.raises(BundleFormatError, match="inside the web build"):
        capgo.encrypt_delta(web, web / "d", sealer, ChecksumFormat.V3, session)
