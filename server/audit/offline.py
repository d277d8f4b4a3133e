"""The audit trail of ``hsmsignd keys``: key changes made on the token with no daemon.

With ``[audit] path`` configured, every ``hsmsignd keys`` command opens the chain ``offline``
in that directory before it reads the key ring (reading it may carry out a destruction that is
due, which the ring records), and refuses to run when that chain cannot be written. The
chain has its own file and lock (``audit-offline.jsonl``, ``audit-offline.lock``) beside the
serving processes' ``audit-N.jsonl``: a daemon serving on the same token at the same time and
a ceremony never write one chain, and two ceremonies at once take turns on the lock. It is
signed by the same audit key, at open and at close, so it verifies with the others
(``hsmsign audit verify DIR``).

A change is recorded write-ahead, since the token cannot take it back: an ``intent`` record
(fsync'd) before the change, then the change, then its outcome record under the same request
id. An intent that cannot be written stops the change (``ChangeRefused``); an outcome that
cannot be written after the change is reported (``OfflineTrail.unaudited``): the change was
made, the trail holds only its intent. The caller is the operating-system user running the
command (``os_identity``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from google.protobuf.message import Message

from hsmsign import auditlog, keycommands
from hsmsign.v1 import hsmsign_pb2 as pb
from server.audit import signing, trail
from server.audit.writer import AuditUnavailable, ChainWriter, Checkpointer
from server.config import Config
from server.errors import ServerError
from server.pkcs11.token import Token

#: The chain of ``hsmsignd keys`` (serving processes' chains are numbered from 1).
OFFLINE_CHAIN = "offline"
#: A record's ``outcome`` for the write-ahead record of an offline change.
INTENT = "intent"

Request = TypeVar("Request", bound=Message)


class ChangeRefused(ServerError):
    """The change was not made: its audit record could not be written first."""


def os_identity() -> dict[str, Any]:
    """The caller of an offline command: the operating-system user running it, and the user
    behind ``sudo`` when there is one (as claims)."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    out: dict[str, Any] = {"kind": "os_user", "name": name, "subject": f"uid={uid}({name})"}
    claims = {k.lower(): os.environ[k] for k in ("SUDO_USER", "SUDO_UID") if os.environ.get(k)}
    if claims:
        out["claims"] = claims
    return out


def _changed_version(op: str, request: Any, key: pb.Key) -> pb.KeyVersion | None:
    """The version a change made (create, rotate, import) or acted on (the others)."""
    if op in ("CreateKey", "RotateKey", "ImportKey"):
        return max(key.versions, key=lambda v: v.version, default=None)
    wanted = getattr(request, "version", 0)
    return next((v for v in key.versions if v.version == wanted), None)


class OfflineTrail:
    """The chain of one ``hsmsignd keys`` run."""

    def __init__(self, writer: ChainWriter) -> None:
        self._writer = writer
        self._identity = os_identity()
        self._peer = f"offline:pid={os.getpid()}"
        #: One line per change that was made but whose outcome record was lost.
        self.unaudited: list[str] = []

    def change(self, op: str, request: Request, run: Callable[[Request], pb.Key]) -> pb.Key:
        """Records ``op``'s intent, runs it, records its outcome. Raises ChangeRefused when
        the intent cannot be written (nothing was changed), and whatever ``run`` raises."""
        ref, inputs, params = trail.summarize(request)
        base: dict[str, Any] = {
            "kind": "call",
            "op": op,
            "identity": self._identity,
            "peer": self._peer,
            "request_id": uuid.uuid4().hex,
            "inputs": inputs,
        }
        if params:
            base["params"] = params
        if ref:
            base["ref"] = ref
            base.update({k: ref[k] for k in ("key", "version") if k in ref})
        started = time.perf_counter()
        try:
            self._writer.append({**base, "time": auditlog.utc_now(), "outcome": INTENT})
        except AuditUnavailable as e:
            raise ChangeRefused(f"{op} not made: {e}") from None

        def outcome(status: str, **fields: Any) -> None:
            ms = round((time.perf_counter() - started) * 1000, 3)
            self._writer.append(
                {
                    **base,
                    **fields,
                    "time": auditlog.utc_now(),
                    "outcome": trail.outcome_of(status),
                    "status": status,
                    "ms": ms,
                }
            )

        try:
            key = run(request)
        except ServerError as e:
            with contextlib.suppress(AuditUnavailable):  # the error is what the user must see
                outcome(e.code.name, message=str(e))
            raise
        except Exception:
            with contextlib.suppress(AuditUnavailable):
                outcome("INTERNAL", message="internal error (see the log)")
            raise
        done: dict[str, Any] = {}
        v = _changed_version(op, request, key)
        if v is not None:
            done = {"key": key.name, "version": v.version, "fingerprint": v.fingerprint}
        try:
            outcome("OK", **done)
        except AuditUnavailable as e:
            what = f"{key.name}@{v.version}" if v is not None else key.name
            self.unaudited.append(
                f"{op} of {what} WAS MADE, but its outcome could not be written to the audit "
                f"trail (it holds only the intent record): {e}"
            )  # printed by hsmsignd keys after the result, with exit code 1
        return key

    def audited(self, backend: keycommands.KeyBackend) -> AuditedKeyAdmin:
        """``backend`` with every change recorded in this trail."""
        return AuditedKeyAdmin(backend, self)


class AuditedKeyAdmin:
    """A keycommands.KeyBackend whose changes go through ``OfflineTrail.change``; reads are
    not recorded (they change nothing)."""

    def __init__(self, inner: keycommands.KeyBackend, trail: OfflineTrail) -> None:
        self._inner, self._trail = inner, trail

    def ListKeys(self, request: pb.ListKeysRequest) -> pb.ListKeysResponse:
        return self._inner.ListKeys(request)

    def GetKey(self, request: pb.GetKeyRequest) -> pb.Key:
        return self._inner.GetKey(request)

    def CreateKey(self, request: pb.CreateKeyRequest) -> pb.Key:
        return self._trail.change("CreateKey", request, self._inner.CreateKey)

    def RotateKey(self, request: pb.RotateKeyRequest) -> pb.Key:
        return self._trail.change("RotateKey", request, self._inner.RotateKey)

    def ImportKey(self, request: pb.ImportKeyRequest) -> pb.Key:
        return self._trail.change("ImportKey", request, self._inner.ImportKey)

    def SetPrimaryVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return self._trail.change("SetPrimaryVersion", request, self._inner.SetPrimaryVersion)

    def DisableKeyVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return self._trail.change("DisableKeyVersion", request, self._inner.DisableKeyVersion)

    def EnableKeyVersion(self, request: pb.KeyVersionRequest) -> pb.Key:
        return self._trail.change("EnableKeyVersion", request, self._inner.EnableKeyVersion)

    def ScheduleKeyVersionDestruction(self, request: pb.ScheduleDestructionRequest) -> pb.Key:
        return self._trail.change(
            "ScheduleKeyVersionDestruction", request, self._inner.ScheduleKeyVersionDestruction
        )

    def CancelKeyVersionDestruction(self, request: pb.KeyVersionRequest) -> pb.Key:
        return self._trail.change(
            "CancelKeyVersionDestruction", request, self._inner.CancelKeyVersionDestruction
        )


@contextlib.contextmanager
def opened(cfg: Config, token: Token) -> Iterator[OfflineTrail | None]:
    """The ``offline`` chain, open for the ``with`` block (None without ``[audit] path``);
    a last checkpoint is signed when it ends. Raises ChangeRefused when the chain cannot be
    written (nothing has been read or changed), StartupError when another command holds it
    for longer than the writer waits, TokenUnavailable when the audit key cannot be used."""
    directory = cfg.audit.directory
    if directory is None:
        yield None
        return

    def checkpointer() -> Checkpointer:
        return signing.audit_key(token, cfg.audit.key_label, directory)[0]

    writer = trail.start(cfg.audit, OFFLINE_CHAIN, checkpointer, lambda ok: None)
    try:
        if writer is None or not writer.healthy:
            raise ChangeRefused(
                f"the audit trail in {directory} cannot be written (the reason is logged "
                "above): nothing was changed"
            )
        yield OfflineTrail(writer)
    finally:
        trail.stop()
