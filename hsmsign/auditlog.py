"""The audit trail's format: records, the hash chain, checkpoints, and the offline verifier.

Shared by the daemon (``server.audit`` writes records) and the client (``hsmsign audit``
verifies and lists them); pure apart from reading the files given to ``verify`` and ``read``.
It imports neither python-pkcs11 nor ``server``.

A trail is one or more *chains* (one per serving process, ``docs/adr/0006-audit-trail.md``).
A chain is a sequence of records, one canonical JSON object per line (sorted keys, no spaces,
UTF-8), numbered by ``seq`` from 0, each naming in ``prev`` the SHA-256 of the previous
record's line (``GENESIS`` for seq 0). A chain lives in files of one directory::

    audit-<chain>.000001.jsonl  audit-<chain>.000002.jsonl ...   rotated, oldest first
    audit-<chain>.jsonl                                           the file being written
    audit-<chain>.checkpoints.jsonl                               a copy of every checkpoint

Rotation only moves on to a new file: the chain, and so ``seq`` and ``prev``, continue across
files. A *checkpoint* is a record of kind ``checkpoint`` whose ``signature`` is made in the HSM
by the audit key over ``checkpoint_statement``: the chain, the seq and the hash of the record
before it. Editing, removing, reordering or inserting a record breaks ``seq`` or ``prev``;
rewriting a whole chain breaks the signatures; cutting the tail is seen against the copies in
the checkpoints file (which operators also ship off the host).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from hsmsign import keyformats

#: Format version written in every record's ``v``.
FORMAT = 1
#: ``prev`` of a chain's first record.
GENESIS = "0" * 64
#: Domain separation: an audit key signature can never be taken for anything else.
CHECKPOINT_CONTEXT = b"hsmsign-audit-checkpoint:v1\n"
#: Record kinds: a gRPC call, something the daemon did by itself, a signed checkpoint.
KINDS = ("call", "event", "checkpoint")

#: The daemon's copy of the audit public key, beside the chains (a convenience: a verifier
#: compares its fingerprint with one obtained out of band).
PUBLIC_KEY_FILE = "audit-key.pem"
CHAIN_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FILE = re.compile(r"^audit-(?P<chain>[A-Za-z0-9_-]{1,64})(?:\.(?P<n>\d{6}))?\.jsonl$")
_CHECKPOINTS = re.compile(r"^audit-(?P<chain>[A-Za-z0-9_-]{1,64})\.checkpoints\.jsonl$")


def encode(record: Mapping[str, Any]) -> bytes:
    """The canonical line of a record (without the newline): what its hash covers."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def line_hash(line: bytes) -> str:
    """SHA-256 of a record's line (without its newline), lowercase hex."""
    return hashlib.sha256(line).hexdigest()


def input_digest(data: bytes) -> str:
    """How a record names an input: its SHA-256, never the bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def decode_tail(line: bytes) -> int:
    """The seq of a chain's last record (where a writer continues). Raises ValueError."""
    value = json.loads(line)
    seq = value.get("seq") if isinstance(value, dict) else None
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("no seq")
    return seq


def record_time(line: bytes) -> float:
    """The ``time`` of a record's line as POSIX seconds. Raises ValueError."""
    value = json.loads(line)
    text = value.get("time") if isinstance(value, dict) else None
    if not isinstance(text, str):
        raise ValueError("no time")
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def current_file(directory: Path, chain: str) -> Path:
    return directory / f"audit-{chain}.jsonl"


def rotated_file(directory: Path, chain: str, n: int) -> Path:
    return directory / f"audit-{chain}.{n:06d}.jsonl"


def checkpoints_file(directory: Path, chain: str) -> Path:
    return directory / f"audit-{chain}.checkpoints.jsonl"


def checkpoint_statement(chain: str, head_seq: int, head: str, time: str) -> bytes:
    """The bytes a checkpoint signs: the chain head (``head_seq`` and its line hash)."""
    body = {"chain": chain, "head": head, "head_seq": head_seq, "time": time}
    return CHECKPOINT_CONTEXT + encode(body)


def checkpoint_digest(chain: str, head_seq: int, head: str, time: str) -> bytes:
    """SHA-256 of the statement: what the HSM signs with RSA-PSS (SHA-256, 32-byte salt)."""
    return hashlib.sha256(checkpoint_statement(chain, head_seq, head, time)).digest()


def signature_valid(public_key: rsa.RSAPublicKey, digest: bytes, signature: bytes) -> bool:
    try:
        public_key.verify(
            signature,
            digest,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            utils.Prehashed(hashes.SHA256()),
        )
    except InvalidSignature:
        return False
    return True


# -- reading -------------------------------------------------------------------------------


class AuditFileError(Exception):
    """A path given to the verifier cannot be read (exit 1 in the CLI)."""


@dataclass(frozen=True)
class Line:
    """One line of a chain file, as stored."""

    path: Path
    number: int  # 1-based line number in its file
    raw: bytes
    record: dict[str, Any] | None  # None: not a JSON object

    @property
    def where(self) -> str:
        return f"{self.path}:{self.number}"

    @property
    def seq(self) -> int | None:
        seq = self.record.get("seq") if self.record else None
        return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _read_lines(path: Path) -> Iterator[Line]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AuditFileError(f"cannot read {path}: {e.strerror}") from None
    pieces = data.split(b"\n")
    torn = pieces.pop()  # after the last newline: empty unless a write was cut short
    for number, raw in enumerate(pieces, start=1):
        if not raw:
            continue
        record: dict[str, Any] | None
        try:
            value = json.loads(raw)
            record = value if isinstance(value, dict) else None
        except (UnicodeDecodeError, ValueError):
            record = None
        yield Line(path, number, raw, record)
    if torn:
        # A last line without its newline: a write cut short. Marked by a sentinel record.
        yield Line(path, -1, torn, None)


@dataclass
class ChainFiles:
    chain: str
    files: list[Path] = field(default_factory=list)  # oldest first, current last
    checkpoints: Path | None = None
    #: How reports name it: the chain, or DIRECTORY/CHAIN when the paths span directories.
    label: str = ""


def discover(paths: Iterable[Path]) -> dict[str, ChainFiles]:
    """Chains under the given files and directories, each with its files oldest first, by
    label. A chain is one name in one directory: replicas each keep a chain 1 in their own
    directory, and their trails are verified together chain by chain.

    Raises AuditFileError for a path that does not exist or names no audit file."""
    found: dict[tuple[Path, str], ChainFiles] = {}

    def chain_of(directory: Path, chain: str) -> ChainFiles:
        return found.setdefault((directory.resolve(), chain), ChainFiles(chain))

    for p in paths:
        if p.is_dir():
            entries = sorted(p.iterdir())
            if not any(_FILE.match(e.name) for e in entries):
                raise AuditFileError(f"{p}: no audit-*.jsonl files in this directory")
        elif p.exists():
            entries = [p]
        else:
            raise AuditFileError(f"cannot read {p}: No such file or directory")
        for e in entries:
            m = _CHECKPOINTS.match(e.name)
            if m:
                chain_of(e.parent, m["chain"]).checkpoints = e
                continue
            m = _FILE.match(e.name)
            if m:
                chain_of(e.parent, m["chain"]).files.append(e)
            elif not p.is_dir():
                raise AuditFileError(f"{e}: not an audit file name (audit-CHAIN[.N].jsonl)")

    def order(path: Path) -> tuple[int, int]:
        m = _FILE.match(path.name)
        return (0, int(m["n"])) if m and m["n"] else (1, 0)

    directories = {d for d, _chain in found}
    by_label: dict[str, ChainFiles] = {}
    for (directory, chain), cf in found.items():
        cf.files.sort(key=order)
        cf.label = chain if len(directories) == 1 else f"{directory}/{chain}"
        by_label[cf.label] = cf
    return by_label


def read(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Every parseable record under the paths, chain by chain, in file order."""
    for cf in discover(paths).values():
        for f in cf.files:
            for line in _read_lines(f):
                if line.record is not None:
                    yield line.record


# -- verifying -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    chain: str
    where: str  # file:line, or the file
    seq: int | None
    message: str

    def __str__(self) -> str:
        at = f" (seq {self.seq})" if self.seq is not None else ""
        return f"chain {self.chain}: {self.where}{at}: {self.message}"


@dataclass
class ChainReport:
    chain: str
    records: int = 0
    last_seq: int | None = None
    checkpoints: int = 0
    #: Records after the last valid checkpoint (not yet covered by a signature).
    unsigned_tail: int = 0
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Report:
    chains: list[ChainReport]

    @property
    def intact(self) -> bool:
        return bool(self.chains) and not any(c.problems for c in self.chains)

    def to_json(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "chains": [
                {
                    "chain": c.chain,
                    "records": c.records,
                    "last_seq": c.last_seq,
                    "checkpoints": c.checkpoints,
                    "unsigned_tail": c.unsigned_tail,
                    "problems": [
                        {"where": p.where, "seq": p.seq, "message": p.message} for p in c.problems
                    ],
                }
                for c in self.chains
            ],
        }


def verify(paths: Iterable[Path], public_key: rsa.RSAPublicKey) -> Report:
    """Checks every chain under the paths: seq and prev of every record, every checkpoint's
    signature by ``public_key``, and the checkpoints file against the chain's tail.

    Only the first break of each chain is reported (after it, nothing in that chain can be
    trusted). Raises AuditFileError when a path cannot be read."""
    fingerprint = keyformats.fingerprint(public_key)
    return Report(
        [_verify_chain(cf, public_key, fingerprint) for _, cf in sorted(discover(paths).items())]
    )


def _verify_chain(cf: ChainFiles, public_key: rsa.RSAPublicKey, fingerprint: str) -> ChainReport:
    report = ChainReport(cf.label or cf.chain)
    hashes_by_seq: dict[int, str] = {}
    expected_seq, prev_hash, prev_where = 0, GENESIS, "the start of the chain"

    def fail(line: Line | Path, message: str) -> ChainReport:
        where = line.where if isinstance(line, Line) else str(line)
        seq = line.seq if isinstance(line, Line) else None
        report.problems.append(Problem(cf.label or cf.chain, where, seq, message))
        return report

    if not cf.files:
        return fail(cf.checkpoints or Path(cf.chain), "checkpoints file without any chain file")
    for path in cf.files:
        for line in _read_lines(path):
            if line.number == -1:
                return fail(path, "the last line is cut short (no newline): the tail was cut")
            rec = line.record
            if rec is None:
                return fail(line, "not a JSON object: the record was changed")
            seq = line.seq
            if seq is None:
                return fail(line, "no valid seq: the record was changed")
            if rec.get("chain") != cf.chain:
                return fail(line, f"names chain {rec.get('chain')!r}: inserted from elsewhere")
            if seq > expected_seq:
                return fail(
                    line,
                    f"records {expected_seq}..{seq - 1} are missing after {prev_where} "
                    "(removed, or a rotated file dropped)",
                )
            if seq < expected_seq:
                return fail(
                    line,
                    f"expected seq {expected_seq} after {prev_where}: "
                    "a record was reordered or inserted here",
                )
            if rec.get("prev") != prev_hash:
                return fail(
                    line,
                    f"prev does not match the hash of the record before it ({prev_where}): "
                    "that record was changed, or this one was",
                )
            if rec.get("kind") == "checkpoint":
                problem = _checkpoint_problem(cf.chain, rec, public_key, fingerprint)
                if problem:
                    return fail(line, problem)
                report.checkpoints += 1
                report.unsigned_tail = 0
            else:
                report.unsigned_tail += 1
            prev_hash = line_hash(line.raw)
            hashes_by_seq[seq] = prev_hash
            prev_where = f"{line.where} (seq {seq})"
            report.records += 1
            report.last_seq = seq
            expected_seq = seq + 1
    if report.records and report.checkpoints == 0:
        return fail(
            cf.files[-1],
            "no valid checkpoint in the chain: nothing in it is signed by the audit key "
            "(rewritten, or the daemon never wrote one)",
        )
    if cf.checkpoints is not None:
        for line in _read_lines(cf.checkpoints):
            rec = line.record
            if rec is None or line.seq is None or rec.get("kind") != "checkpoint":
                return fail(line, "not a checkpoint record: the checkpoints file was changed")
            problem = _checkpoint_problem(cf.chain, rec, public_key, fingerprint)
            if problem:
                return fail(line, problem)
            head_seq = line.seq - 1
            if line.seq not in hashes_by_seq:
                return fail(
                    line,
                    f"the chain ends at {prev_where}, but a checkpoint signed seq {head_seq}: "
                    "the tail was cut after that point",
                )
            if hashes_by_seq[line.seq] != line_hash(line.raw):
                return fail(line, "differs from the chain's checkpoint record with this seq")
    return report


def _checkpoint_problem(
    chain: str, rec: Mapping[str, Any], public_key: rsa.RSAPublicKey, fingerprint: str
) -> str | None:
    if rec.get("key_fingerprint") != fingerprint:
        return (
            f"checkpoint signed by key sha256:{rec.get('key_fingerprint')}, not the given "
            f"public key (sha256:{fingerprint})"
        )
    try:
        signature = bytes.fromhex(str(rec["signature"]))
        digest = checkpoint_digest(chain, int(rec["seq"]) - 1, str(rec["prev"]), str(rec["time"]))
    except (KeyError, ValueError):
        return "checkpoint without a valid signature field"
    if not signature_valid(public_key, digest, signature):
        return "checkpoint signature does not verify: the chain up to here was rewritten"
    return None


# -- listing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """Which records ``hsmsign audit show`` lists; every field left None matches all."""

    key: str | None = None
    identity: str | None = None  # a substring of the identity's name or subject
    operation: str | None = None
    since: str | None = None  # ISO 8601 UTC, inclusive
    until: str | None = None  # exclusive

    def matches(self, rec: Mapping[str, Any]) -> bool:
        if self.key is not None and self.key not in (rec.get("key"), rec.get("fingerprint")):
            return False
        if self.operation is not None and rec.get("op") != self.operation:
            return False
        if self.identity is not None:
            ident = rec.get("identity")
            text = json.dumps(ident, sort_keys=True) if ident is not None else ""
            if self.identity not in text:
                return False
        t = str(rec.get("time", ""))
        if self.since is not None and t < self.since:
            return False
        return not (self.until is not None and t >= self.until)
