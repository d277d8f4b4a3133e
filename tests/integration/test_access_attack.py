"""The attack from issue 14, as an attacker on this host would try it: no credentials at all,
on the daemon's plaintext port, import an own key and make it the primary."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import TokenDir, start_daemon, write_config


def test_no_credentials_cannot_import_a_primary_key(token: TokenDir, tmp_path: Path) -> None:
    """A plaintext daemon whose config grants nothing: the import is PERMISSION_DENIED, names
    the operation, and the key ring is unchanged."""
    mallory = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "mallory.pem"
    pem.write_bytes(
        mallory.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    # The local development identity, with no grant: the default is to deny.
    cfg = write_config(tmp_path / "c.toml", token, policy="[identities.local]\nenabled = true\n")
    d = start_daemon(cfg, tmp_path / "d")
    try:
        r = d.hsmsign("keys", "import", "--name", "victim", "--make-primary", str(pem), check=False)
        err = r.stderr.decode()
        assert r.returncode != 0, "the import went through"
        # Refused at the first call, GetImportWrappingKey (it needs `import` on some key),
        # before the key is even wrapped.
        assert "PERMISSION_DENIED" in err and "may not import keys" in err, err
        assert token.label not in err
    finally:
        d.stop()
