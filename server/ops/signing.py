"""Signing operations, as plain functions of (token, key version, bytes).

Every mechanism and parameter comes from ``server.pkcs11.mechanisms``; nothing relies on
python-pkcs11's defaults (docs/design-facts.md, fact 4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Final

from server.api import deadlines
from server.errors import InvalidArgument
from server.keyring.model import KeyVersion
from server.pkcs11.mechanisms import RSA_PKCS, RSA_PSS_SHA256, RSA_PSS_SHA384, RSA_PSS_SHA512, Mech
from server.pkcs11.session import Session
from server.pkcs11.token import Token

#: Most digests one batch call may carry.
MAX_BATCH = 10_000

#: A batch is split across sessions only when every part gets at least this many digests:
#: one handoff to a helper thread costs far less than one RSA signature, but not nothing.
MIN_DIGESTS_PER_SESSION = 8

# Helper threads that sign the further parts of a split batch: one session is one core of a
# software token, so a batch on one session would use one core only.
_BATCH_HELPERS = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="batch")


@dataclass(frozen=True)
class SignatureScheme:
    """How a client-computed digest becomes a signature."""

    name: str
    hash_name: str
    digest_size: int
    mech: Mech
    #: DER DigestInfo prefix for PKCS#1 v1.5 (CKM_RSA_PKCS signs prefix || digest);
    #: empty for PSS, where the token builds the encoding from the parameters.
    digest_info: bytes


SCHEMES: Final[dict[str, SignatureScheme]] = {
    s.name: s
    for s in (
        SignatureScheme(
            "rsa-pkcs1-sha256",
            "SHA-256",
            32,
            RSA_PKCS,
            bytes.fromhex("3031300d060960864801650304020105000420"),
        ),
        SignatureScheme(
            "rsa-pkcs1-sha384",
            "SHA-384",
            48,
            RSA_PKCS,
            bytes.fromhex("3041300d060960864801650304020205000430"),
        ),
        SignatureScheme(
            "rsa-pkcs1-sha512",
            "SHA-512",
            64,
            RSA_PKCS,
            bytes.fromhex("3051300d060960864801650304020305000440"),
        ),
        SignatureScheme("rsa-pss-sha256", "SHA-256", 32, RSA_PSS_SHA256, b""),
        SignatureScheme("rsa-pss-sha384", "SHA-384", 48, RSA_PSS_SHA384, b""),
        SignatureScheme("rsa-pss-sha512", "SHA-512", 64, RSA_PSS_SHA512, b""),
    )
}


def _check_digest(scheme: SignatureScheme, digest: bytes, where: str = "digest") -> bytes:
    if len(digest) != scheme.digest_size:
        raise InvalidArgument(
            f"{where} is {len(digest)} bytes; {scheme.name} needs a {scheme.hash_name} digest "
            f"of exactly {scheme.digest_size} bytes"
        )
    return scheme.digest_info + digest


def sign_digest(token: Token, key: KeyVersion, scheme: SignatureScheme, digest: bytes) -> bytes:
    """Signs one digest. Raises InvalidArgument for a wrong length; token errors classified."""
    data = _check_digest(scheme, digest)
    caller_gone = deadlines.batch_check()

    def run(s: Session) -> bytes:
        caller_gone()  # it may have gone while the call waited for a session
        return s.sign(key.cka_id, scheme.mech, data)

    # Signing has no side effects: a session or device fault is retried once (Token.run).
    signature = token.run(f"signing with {scheme.mech.description}", run)
    deadlines.tally.signed(1)
    return signature


def sign_digests(
    token: Token, key: KeyVersion, scheme: SignatureScheme, digests: Sequence[bytes]
) -> list[bytes]:
    """Signs many digests with one key lookup; large batches use several sessions at once."""
    if not digests:
        raise InvalidArgument("digests is empty; send 1 to 10,000 digests")
    if len(digests) > MAX_BATCH:
        raise InvalidArgument(f"{len(digests)} digests in one call; at most {MAX_BATCH:,} allowed")
    blocks = [_check_digest(scheme, d, f"digests[{i}]") for i, d in enumerate(digests)]
    return sign_blocks(token, key, scheme.mech, blocks, f"signing with {scheme.mech.description}")


def sign_blocks(
    token: Token, key: KeyVersion, mech: Mech, blocks: Sequence[bytes], what: str
) -> list[bytes]:
    """Signs already-encoded blocks in order with ``mech``; a large batch is split across
    sessions signing in parallel (one SoftHSM2 session signs on one core). Only the operations
    in ``server.ops`` call this, after checking every block's length. Stops between chunks of
    ``deadlines.CHECK_EVERY`` once the caller has gone (DeadlineExceeded, Cancelled:
    server.api.deadlines)."""
    caller_gone = deadlines.batch_check()

    def sign_part(part: Sequence[bytes]) -> list[bytes]:
        def run(s: Session) -> list[bytes]:
            out: list[bytes] = []
            for start in range(0, len(part), deadlines.CHECK_EVERY):
                caller_gone()
                out += s.sign_many(key.cka_id, mech, part[start : start + deadlines.CHECK_EVERY])
                deadlines.tally.signed(len(out) - start)
            return out

        return token.run(what, run)

    lanes = min(_parallel_sessions(token), len(blocks) // MIN_DIGESTS_PER_SESSION)
    if lanes <= 1:
        return sign_part(blocks)
    size = -(-len(blocks) // lanes)
    parts = [blocks[i : i + size] for i in range(0, len(blocks), size)]
    # The caller signs the first part itself and holds no session while it waits for the
    # helpers, so helpers waiting for a session can never deadlock against their callers.
    helpers = [_BATCH_HELPERS.submit(sign_part, p) for p in parts[1:]]
    try:
        out = sign_part(parts[0])
    finally:
        futures.wait(helpers)  # no helper keeps signing after the call has answered
    for h in helpers:
        out += h.result()
    return out


def _parallel_sessions(token: Token) -> int:
    """How many sessions one batch may use at once: 1 for a serialized module; else bounded
    by the pool and by the cores (SoftHSM2 signs on the calling thread)."""
    if token.config.threading == "serialized":
        return 1
    return max(1, min(token.config.sessions, os.cpu_count() or 1))
