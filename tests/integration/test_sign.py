"""SignDigest, SignDigests and GetPublicKey through a real daemon on a real SoftHSM2 token."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from hsmsign.client import Client
from hsmsign.errors import RemoteError
from tests.conftest import Daemon

HASHES = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


def _public_key(client: Client, key: str = "demo") -> rsa.RSAPublicKey:
    pk = serialization.load_der_public_key(client.public_key(key).spki_der)
    assert isinstance(pk, rsa.RSAPublicKey)
    return pk


@pytest.mark.parametrize(
    "algorithm",
    [
        "rsa-pkcs1-sha256",
        "rsa-pkcs1-sha384",
        "rsa-pkcs1-sha512",
        "rsa-pss-sha256",
        "rsa-pss-sha384",
        "rsa-pss-sha512",
    ],
)
@pytest.mark.parametrize("key", ["demo", "big"])
def test_signatures_verify_with_cryptography(client: Client, algorithm: str, key: str) -> None:
    hash_name = algorithm.rsplit("-", 1)[1]
    algo = HASHES[hash_name]
    digest = hashlib.new(hash_name, b"release 1.2.3").digest()
    sig = client.sign_digest(key, digest, algorithm)
    pub = _public_key(client, key)
    assert len(sig.signature) == pub.key_size // 8
    pad = (
        padding.PSS(padding.MGF1(algo), algo.digest_size)
        if "pss" in algorithm
        else padding.PKCS1v15()
    )
    pub.verify(sig.signature, digest, pad, Prehashed(algo))  # raises if wrong
    assert sig.key.name == key and sig.key.version == 1
    assert sig.key.fingerprint == hashlib.sha256(client.public_key(key).spki_der).hexdigest()


def test_pkcs1_signature_is_deterministic_and_pss_is_not(client: Client) -> None:
    d = hashlib.sha256(b"x").digest()
    assert client.sign_digest("demo", d).signature == client.sign_digest("demo", d).signature
    a = client.sign_digest("demo", d, "rsa-pss-sha256").signature
    assert a != client.sign_digest("demo", d, "rsa-pss-sha256").signature


def test_public_key_formats_agree(client: Client) -> None:
    pk = client.public_key("demo")
    spki = serialization.load_pem_public_key(pk.spki_pem.encode())
    pkcs1 = serialization.load_pem_public_key(pk.pkcs1_pem.encode())
    assert pk.spki_pem.startswith("-----BEGIN PUBLIC KEY-----")
    assert pk.pkcs1_pem.startswith("-----BEGIN RSA PUBLIC KEY-----")
    assert spki.public_numbers() == pkcs1.public_numbers()  # type: ignore[union-attr]
    assert pk.key.capgo_key_id == "".join(pk.pkcs1_pem.splitlines()[1:])[:20]
    assert pk.key.modulus_bits == 2048


def test_key_by_fingerprint_and_version(client: Client) -> None:
    fp = client.public_key("demo").key.fingerprint
    assert client.public_key(f"sha256:{fp}").key.name == "demo"
    assert client.public_key("demo@1").key.fingerprint == fp
    d = hashlib.sha256(b"y").digest()
    assert client.sign_digest(f"sha256:{fp}", d).key.name == "demo"


def test_batch_signing_matches_unary(client: Client) -> None:
    digests = [hashlib.sha256(bytes([i])).digest() for i in range(50)]
    info, sigs = client.sign_digests("demo", digests)
    assert info.name == "demo" and len(sigs) == 50
    assert sigs[7] == client.sign_digest("demo", digests[7]).signature
    # A batch this size is split across sessions: the parts come back in order.
    assert sigs[-1] == client.sign_digest("demo", digests[-1]).signature


def test_cli_sign_verifies_with_openssl(daemon: Daemon, tmp_path: Path) -> None:
    release = tmp_path / "release.tar.gz"
    release.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 1000)
    pub = tmp_path / "pub.pem"
    sig = tmp_path / "sig"
    daemon.hsmsign("pubkey", "demo", "-o", str(pub))
    daemon.hsmsign("sign", "--key", "demo", "--file", str(release), "-o", str(sig))
    r = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(release)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "Verified OK" in r.stdout
    # and the other way round: a different file must not verify
    release.write_bytes(b"tampered")
    r = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", str(pub), "-signature", str(sig), str(release)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0


def test_cli_pss_verifies_with_openssl(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"pss" * 999)
    daemon.hsmsign("pubkey", "demo", "-o", str(tmp_path / "pub.pem"))
    daemon.hsmsign(
        "sign",
        "--key",
        "demo",
        "--file",
        str(f),
        "--algorithm",
        "rsa-pss-sha512",
        "-o",
        str(tmp_path / "sig"),
    )
    r = subprocess.run(
        [
            "openssl",
            "dgst",
            "-sha512",
            "-sigopt",
            "rsa_padding_mode:pss",
            "-sigopt",
            "rsa_pss_saltlen:64",
            "-verify",
            str(tmp_path / "pub.pem"),
            "-signature",
            str(tmp_path / "sig"),
            str(f),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr


def test_cli_verify_and_formats(daemon: Daemon, tmp_path: Path) -> None:
    f = tmp_path / "f.txt"
    f.write_text("hello")
    out = daemon.hsmsign("sign", "--key", "demo", "--file", str(f)).stdout.strip()
    assert len(base64.b64decode(out)) == 256
    (tmp_path / "sig.b64").write_bytes(out)
    ok = daemon.hsmsign(
        "verify", "--key", "demo", "--file", str(f), "--signature", str(tmp_path / "sig.b64")
    )
    assert b"signature OK" in ok.stdout
    f.write_text("hellO")
    bad = daemon.hsmsign(
        "verify",
        "--key",
        "demo",
        "--file",
        str(f),
        "--signature",
        str(tmp_path / "sig.b64"),
        check=False,
    )
    assert bad.returncode == 3 and b"verification failed" in bad.stderr
    assert b"Traceback" not in bad.stderr
    for fmt, marker in [
        ("spki", b"BEGIN PUBLIC KEY"),
        ("pkcs1", b"BEGIN RSA PUBLIC KEY"),
        ("capgo", b"BEGIN RSA PUBLIC KEY"),
        ("json", b'"capgo_key_id"'),
    ]:
        assert marker in daemon.hsmsign("pubkey", "demo", "--format", fmt).stdout
    der = daemon.hsmsign("pubkey", "demo", "--format", "der").stdout
    assert serialization.load_der_public_key(der).key_size == 2048  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("key", "algorithm", "digest", "status", "words"),
    [
        ("demo", "rsa-pkcs1-sha256", b"\x00" * 31, "INVALID_ARGUMENT", "exactly 32 bytes"),
        ("demo", "rsa-pkcs1-sha512", b"\x00" * 32, "INVALID_ARGUMENT", "exactly 64 bytes"),
        ("demo", "rsa-pss-sha384", b"", "INVALID_ARGUMENT", "exactly 48 bytes"),
        ("nosuchkey", "rsa-pkcs1-sha256", b"\x00" * 32, "NOT_FOUND", "no key 'nosuchkey'"),
        ("demo@9", "rsa-pkcs1-sha256", b"\x00" * 32, "NOT_FOUND", "version 9"),
        ("sha256:" + "ab" * 32, "rsa-pkcs1-sha256", b"\x00" * 32, "NOT_FOUND", "fingerprint"),
        ("sha256:abc", "rsa-pkcs1-sha256", b"\x00" * 32, "INVALID_ARGUMENT", "64 hex"),
    ],
)
def test_bad_requests_get_specific_status(
    client: Client, key: str, algorithm: str, digest: bytes, status: str, words: str
) -> None:
    with pytest.raises(RemoteError) as e:
        client.sign_digest(key, digest, algorithm)
    assert e.value.status_name == status
    assert words in e.value.message
    # and the daemon keeps serving
    assert len(client.sign_digest("demo", b"\x01" * 32).signature) == 256


def test_empty_and_unknown_algorithm_requests(client: Client) -> None:
    from hsmsign.v1 import hsmsign_pb2 as pb

    with pytest.raises(RemoteError) as e:
        client.call(lambda: client.signer.SignDigest(pb.SignDigestRequest()))
    assert e.value.status_name == "INVALID_ARGUMENT" and "algorithm" in e.value.message
    with pytest.raises(RemoteError) as e:
        client.call(
            lambda: client.signer.SignDigest(
                pb.SignDigestRequest(
                    algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256, digest=b"\x00" * 32
                )
            )
        )
    assert e.value.status_name == "INVALID_ARGUMENT" and "key is missing" in e.value.message
    with pytest.raises(RemoteError) as e:
        client.call(
            lambda: client.signer.SignDigest(
                pb.SignDigestRequest(
                    key=pb.KeyRef(name="demo"),
                    algorithm=99,  # type: ignore[arg-type]
                    digest=b"\x00" * 32,
                )
            )
        )
    assert e.value.status_name == "INVALID_ARGUMENT" and "not supported" in e.value.message
    with pytest.raises(RemoteError) as e:
        client.sign_digests("demo", [])
    assert e.value.status_name == "INVALID_ARGUMENT"
    with pytest.raises(RemoteError) as e:
        client.sign_digests("demo", [b"\x00" * 32, b"\x00" * 5])
    assert "digests[1]" in e.value.message


def test_log_carries_no_digest(client: Client, daemon: Daemon) -> None:
    digest = hashlib.sha256(b"secret-ish release").digest()
    client.sign_digest("demo", digest)
    log = daemon.wait_log("SignDigest", "status=OK key=demo@1")
    assert digest.hex() not in log and base64.b64encode(digest).decode() not in log
