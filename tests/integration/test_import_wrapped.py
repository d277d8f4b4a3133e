"""ImportKey without plaintext on the wire: the wrapped path end to end on a real SoftHSM2
token and daemon, with a loopback proxy that records every byte of the (plaintext gRPC)
channel, and the refusals."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.hashes import SHA256

from hsmsign import key_wrap, keyformats
from hsmsign.admin import KeyAdmin
from hsmsign.client import Client
from hsmsign.errors import RemoteError, UsageError
from hsmsign.v1 import hsmsign_pb2 as pb
from tests.conftest import HSMSIGN, Daemon, TokenDir, make_token, start_daemon, write_config

KEYRING = (
    "[keyring]\nmin_destruction_delay_hours = 0\ndev_unsafe_allow_short_destruction_delay = true\n"
    "refresh_seconds = 0.5\n"
)
# One serving process: on a fresh token, a second one starting while the first creates the
# implicit-rejection secret can fail in C_GetTokenInfo (seen under load; not about import).
DEFAULT = "[server]\nprocesses = 1\n"
#: The plaintext ceremony: accepted on the admin socket only (KeyAdmin is served only there).
CEREMONY = (
    '[server]\nprocesses = 1\nallow_plaintext_import = true\nadmin_listen = "unix:{socket}"\n'
)
CEREMONY_POLICY = """
[identities.local]
enabled = true
[[policy.grant]]
identities = ["local", "admin-socket"]
keys = ["*"]
operations = ["*"]
"""
DIGEST = hashlib.sha256(b"bundle").digest()


class RecordingProxy:
    """A loopback TCP proxy that forwards to ``target`` (HOST:PORT or unix:PATH) and keeps
    every byte it carries."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._seen = bytearray()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._seen)

    def _accept(self) -> None:
        while not self._closed:
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            if self._target.startswith("unix:"):
                up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                up.settimeout(30)
                up.connect(self._target[len("unix:") :])
            else:
                host, _, port = self._target.rpartition(":")
                up = socket.create_connection((host, int(port)), timeout=30)
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self._seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TokenDir, Daemon, Daemon]]:
    """One token; a daemon with the defaults and one that allows the plaintext ceremony."""
    tmp = tmp_path_factory.mktemp("import-wrapped")
    t = make_token(tmp / "token")
    default = start_daemon(
        write_config(tmp / "default.toml", t, extra=KEYRING + DEFAULT), tmp / "d"
    )
    ceremony_config = write_config(
        tmp / "ceremony.toml",
        t,
        extra=KEYRING + CEREMONY.format(socket=_admin_socket_path(tmp / "c")),
        policy=CEREMONY_POLICY,
    )
    ceremony = start_daemon(ceremony_config, tmp / "c")
    yield t, default, ceremony
    default.stop()
    ceremony.stop()


def _admin_socket_path(daemon_tmp: Path) -> Path:
    return daemon_tmp / "admin.sock"


def _admin(ceremony: Daemon) -> str:
    """The ceremony daemon's admin socket, where KeyAdmin (and the plaintext form) is served."""
    return f"unix:{_admin_socket_path(ceremony.tmp)}"


def _pkcs8(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _secrets(key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    """What must never cross the wire: d, p, q as big-endian bytes, and the PKCS#8 DER."""
    n = key.private_numbers()

    def big(v: int) -> bytes:
        return v.to_bytes((v.bit_length() + 7) // 8, "big")

    return {"d": big(n.d), "p": big(n.p), "q": big(n.q), "pkcs8": _pkcs8(key)}


def _leaks(captured: bytes, key: rsa.RSAPrivateKey) -> list[str]:
    found = [name for name, value in _secrets(key).items() if value in captured]
    der = _pkcs8(key)
    # The PKCS#8 holds n and e, which are public (and sent as the key's SPKI): a window is a
    # leak when it is not also part of the public key's encodings.
    public = _spki(key) + key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.PKCS1
    )
    windows = sum(
        1
        for i in range(len(der) - 31)
        if der[i : i + 32] in captured and der[i : i + 32] not in public
    )
    if windows:
        found.append(f"{windows} 32-byte windows of the PKCS#8 DER")
    return found


def _hsmsign(address: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [HSMSIGN, "--server", address, *args], capture_output=True, timeout=120, cwd=cwd
    )


def _verify(pub: rsa.RSAPublicKey, signature: bytes) -> None:
    pub.verify(signature, DIGEST, padding.PKCS1v15(), Prehashed(SHA256()))


def test_wrapped_import_round_trip_leaves_no_key_bytes_on_the_wire(
    daemons: tuple[TokenDir, Daemon, Daemon], tmp_path: Path
) -> None:
    token, daemon, _ = daemons
    original = rsa.generate_private_key(65537, 2048)
    key_file = tmp_path / ".capgo_key_v2"
    key_file.write_bytes(
        original.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    proxy = RecordingProxy(daemon.address)
    try:
        r = _hsmsign(
            proxy.address, tmp_path, "keys", "import", str(key_file), "--name", "w", "--json"
        )
        assert r.returncode == 0, r.stderr.decode()
        captured = proxy.captured()
    finally:
        proxy.close()
    assert b"GetImportWrappingKey" in captured and b"ImportKey" in captured  # it was recorded
    assert _leaks(captured, original) == []
    assert b"RSA-OAEP SHA-1" in r.stderr  # SoftHSM2 2.6.1: the client says what it follows
    with Client(daemon.address) as c:
        fp = KeyAdmin(c).import_wrapping_key().fingerprint
    assert f"import key sha256:{fp}".encode() in r.stderr
    daemon.wait_log(
        f"created the token's import wrapping key sha256:{fp}",
        "CKM_RSA_PKCS_OAEP with SHA-1",  # the fallback is logged
    )
    out = json.loads(r.stdout)
    pub = original.public_key()
    assert out["fingerprint"] == keyformats.fingerprint(pub)
    assert out["provenance"]["imported"] is True and out["provenance"]["local"] is False
    assert out["provenance"]["sensitive"] is True and out["provenance"]["extractable"] is False
    with Client(daemon.address) as c:
        sig = c.sign_digest("w", DIGEST)
    _verify(pub, sig.signature)
    # The import wrapping key can unwrap and nothing else.
    listing = token.pkcs11_tool("-O")
    blocks = [
        b
        for b in listing.split("Private Key Object;")[1:]
        if "label:      hsmsign-import-wrapping\n" in b.split("Object;", 1)[0]
    ]
    assert blocks, listing
    for block in blocks:
        usage = block.split("Object;", 1)[0].split("Usage:", 1)[1].split("\n", 1)[0]
        assert usage.split() == ["unwrap"], usage


def test_plaintext_ceremony_shows_the_key_on_the_wire(
    daemons: tuple[TokenDir, Daemon, Daemon], tmp_path: Path
) -> None:
    """The same capture finds d, p, q and the PKCS#8 in the plaintext form: the check bites."""
    _, _, ceremony = daemons
    original = rsa.generate_private_key(65537, 2048)
    key_file = tmp_path / "k.der"
    key_file.write_bytes(_pkcs8(original))
    proxy = RecordingProxy(_admin(ceremony))
    try:
        r = _hsmsign(
            proxy.address,
            tmp_path,
            "keys",
            "import",
            str(key_file),
            "--name",
            "ceremony",
            "--plaintext-ceremony",
        )
        assert r.returncode == 0, r.stderr.decode()
        captured = proxy.captured()
    finally:
        proxy.close()
    assert b"in clear" in r.stderr
    leaks = _leaks(captured, original)
    assert {"d", "p", "q", "pkcs8"} <= set(leaks)
    ceremony.wait_log("plaintext ImportKey accepted")
    with Client(ceremony.address) as c:
        _verify(original.public_key(), c.sign_digest("ceremony", DIGEST).signature)


def test_plaintext_import_is_refused_by_default(daemons: tuple[TokenDir, Daemon, Daemon]) -> None:
    _, daemon, _ = daemons
    der = _pkcs8(rsa.generate_private_key(65537, 2048))
    with Client(daemon.address) as c, pytest.raises(RemoteError) as e:
        KeyAdmin(c).import_key_plaintext("clear", der)
    assert e.value.status_name == "FAILED_PRECONDITION"
    assert "wrapped" in e.value.message and "hsmsignd keys import" in e.value.message
    with Client(daemon.address) as c, pytest.raises(RemoteError) as e:
        KeyAdmin(c).get_key("clear")
    assert e.value.status_name == "NOT_FOUND"


def _pss_oid(der: bytes) -> bytes:
    """The same key with the id-RSASSA-PSS OID (no parameters) instead of rsaEncryption."""
    old = bytes.fromhex("300d06092a864886f70d0101010500")
    new = der.replace(old, bytes.fromhex("300b06092a864886f70d01010a"))
    length = int.from_bytes(new[2:4], "big") - 2
    return new[:2] + length.to_bytes(2, "big") + new[4:]


def _spki(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _wrapped_request(name: str, wrapped: pb.WrappedPrivateKey) -> pb.ImportKeyRequest:
    return pb.ImportKeyRequest(name=name, purpose=pb.KEY_PURPOSE_SIGN, wrapped=wrapped)


def _refused(address: str, request: pb.ImportKeyRequest) -> RemoteError:
    with Client(address) as c:
        with pytest.raises(RemoteError) as e:
            c.call(lambda: c.admin.ImportKey(request, timeout=60))
        with pytest.raises(RemoteError) as gone:
            KeyAdmin(c).get_key(request.name)
        assert gone.value.status_name == "NOT_FOUND"  # nothing left in the ring
    return e.value


def test_daemon_refuses_unsuitable_wrapped_keys(daemons: tuple[TokenDir, Daemon, Daemon]) -> None:
    """Whatever a client sends wrapped: e != 65537, a public key that does not match, a
    non-RSA key; and the client itself refuses them before sending."""
    _, daemon, _ = daemons
    with Client(daemon.address) as c:
        to = KeyAdmin(c).import_wrapping_key()
    e3 = rsa.generate_private_key(3, 2048)
    good = rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    cases = [
        ("e3", key_wrap.wrap_pkcs8(_pkcs8(e3), _spki(e3), to), "public exponent is 3"),
        # The claim says e = 65537; the token unwraps e = 3: the object is destroyed again.
        ("e3-lying", key_wrap.wrap_pkcs8(_pkcs8(e3), _spki(good), to), "public exponent is 3"),
        ("ec", key_wrap.wrap_pkcs8(_pkcs8(ec_key), _spki(ec_key), to), "only RSA"),
        ("ec-lying", key_wrap.wrap_pkcs8(_pkcs8(ec_key), _spki(good), to), "refused"),
    ]
    for name, wrapped, message in cases:
        err = _refused(daemon.address, _wrapped_request(name, wrapped))
        assert err.status_name == "INVALID_ARGUMENT", (name, err.message)
        assert message in err.message, (name, err.message)
    # A wrong wrapping key fingerprint or OAEP hash: FAILED_PRECONDITION, saying what to do.
    wrapped = key_wrap.wrap_pkcs8(_pkcs8(good), _spki(good), to)
    wrapped.wrapping_key_fingerprint = "00" * 32
    err = _refused(daemon.address, _wrapped_request("fp", wrapped))
    assert err.status_name == "FAILED_PRECONDITION" and "GetImportWrappingKey" in err.message
    wrapped = key_wrap.wrap_pkcs8(_pkcs8(good), _spki(good), to)
    wrapped.oaep_hash = pb.OAEP_HASH_SHA256
    err = _refused(daemon.address, _wrapped_request("oaep", wrapped))
    assert err.status_name == "FAILED_PRECONDITION" and "SHA-1" in err.message
    # The client library refuses before anything is sent.
    with Client(daemon.address) as c:
        for der in (_pkcs8(e3), _pss_oid(_pkcs8(good)), _pkcs8(ec_key)):
            with pytest.raises(UsageError):
                KeyAdmin(c).import_key("never", der)


def test_non_rsa_encryption_oids_are_refused(
    daemons: tuple[TokenDir, Daemon, Daemon], tmp_path: Path
) -> None:
    """An RSA-PSS-OID or EC key: the CLI, and the daemon's plaintext ceremony, refuse it
    (cryptography would load the PSS key as plain RSA and re-encode it as rsaEncryption)."""
    _, _, ceremony = daemons
    pss = _pss_oid(_pkcs8(rsa.generate_private_key(65537, 2048)))
    ec_der = _pkcs8(ec.generate_private_key(ec.SECP256R1()))
    for der in (pss, ec_der):
        with Client(_admin(ceremony)) as c, pytest.raises(RemoteError) as e:
            KeyAdmin(c).import_key_plaintext("oid", der)
        assert e.value.status_name == "INVALID_ARGUMENT"
        assert "rsaEncryption" in e.value.message
    f = tmp_path / "pss.der"
    f.write_bytes(pss)
    r = _hsmsign(_admin(ceremony), tmp_path, "keys", "import", str(f), "--name", "oid")
    assert r.returncode != 0 and b"rsaEncryption" in r.stderr and b"Traceback" not in r.stderr
    e3 = tmp_path / "e3.der"
    e3.write_bytes(_pkcs8(rsa.generate_private_key(3, 2048)))
    r = _hsmsign(_admin(ceremony), tmp_path, "keys", "import", str(e3), "--name", "oid")
    assert r.returncode != 0 and b"public exponent is 3" in r.stderr
