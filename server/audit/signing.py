"""The audit key: an RSA-2048 key pair in the token that signs audit checkpoints and nothing
else. Its label (``[audit] key_label``, default ``hsmsign-audit:v1``) is outside the key
ring's ``hsmsign:`` namespace, so no Signer or KeyAdmin call can resolve it; its private key
has CKA_SIGN only (no decrypt, unwrap or derive); every signature is over a digest of a
statement that starts with ``hsmsign.auditlog.CHECKPOINT_CONTEXT``."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from hsmsign import auditlog, keyformats
from server.audit.writer import Checkpointer
from server.errors import StartupError
from server.pkcs11.mechanisms import RSA_PSS_SHA256
from server.pkcs11.objects import KeyObjectInfo
from server.pkcs11.token import Token

log = logging.getLogger("hsmsign.audit")

#: Copy of the audit public key written beside the chains, for convenience only: a verifier
#: must compare its fingerprint with one obtained out of band (docs/adr/0006-audit-trail.md).
PUBLIC_KEY_FILE = auditlog.PUBLIC_KEY_FILE


def _find(token: Token, label: str) -> KeyObjectInfo | None:
    with token.session("finding the audit key") as s:
        found = [o for o in s.find_key_objects(label) if o.label == label]
    if len(found) > 1:
        raise StartupError(f"the token holds {len(found)} audit keys labelled {label!r}")
    return found[0] if found else None


def audit_key(token: Token, label: str, directory: Path) -> tuple[Checkpointer, rsa.RSAPublicKey]:
    """Finds the audit key in the token, creating it on first use (under a file lock in the
    audit directory, so that serving processes starting together make one key). Writes its
    public key to ``directory/audit-key.pem``. Raises StartupError, or TokenUnavailable
    when the token fails."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = _find(token, label)
    if info is None:
        with contextlib.ExitStack() as stack:
            try:
                lock = stack.enter_context(open(directory / "audit-key.lock", "a"))
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:
                pass  # a directory we cannot write: the chain writer reports it; go on unlocked
            info = _find(token, label)
            if info is None:
                with token.session("creating the audit key") as s:
                    info = s.generate_rsa_keypair(
                        2048, label, b"hsmsign-audit:" + os.urandom(8), sign=True, decrypt=False
                    )
                log.warning("created the audit key %r in the token", label)
    if not info.can_sign or info.can_decrypt or info.can_unwrap or info.extractable:
        raise StartupError(
            f"the token's audit key {label!r} may do more than sign, or is extractable: "
            "it must be a sign-only, non-extractable key of its own"
        )
    public_key = keyformats.public_key_from_numbers(info.modulus, info.public_exponent)
    fingerprint = keyformats.fingerprint(public_key)
    cka_id = info.cka_id

    def sign(digest: bytes) -> bytes:
        with token.session("signing an audit checkpoint") as s:
            return s.sign(cka_id, RSA_PSS_SHA256, digest)

    _write_public_key(directory / PUBLIC_KEY_FILE, keyformats.spki_pem(public_key))
    log.info("audit key %r: sha256:%s (checkpoints are signed with it)", label, fingerprint)
    return Checkpointer(fingerprint, sign), public_key


def _write_public_key(path: Path, pem: str) -> None:
    with contextlib.suppress(OSError):  # a convenience copy: a read-only directory is reported
        if path.exists() and path.read_text() == pem:  # by the chain writer, not here
            return
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".audit-key-")
        with os.fdopen(fd, "w") as f:
            f.write(pem)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
