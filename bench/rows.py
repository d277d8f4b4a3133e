"""The bench's rows: one dataclass per kind of measurement.

bench.run makes them, bench.report reads them by their fields (what was measured, how, on
which server, in which round). A row's ``name`` is for people: nothing finds a row by its
name or by its position in the list.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Server(StrEnum):
    """What served the calls of a CallRow."""

    HSMSIGND = "hsmsignd"
    #: bench/bare_server.py: grpcio + python-pkcs11 on the same token, no hsmsign code.
    BARE = "bare"
    #: bench/bare_server.py --no-sign: gRPC that signs nothing (the p99 floor).
    NOOP = "noop"


class Call(StrEnum):
    """The RPC a CallRow measured (bench.load.LoadSpec.call)."""

    UNARY = "unary"  # SignDigest
    BATCH = "batch"  # SignDigests
    SEAL = "seal"  # SealBundle: 2 signatures
    HEALTH = "health"  # grpc.health Check: no hsmsign code
    FLOOR = "floor"  # GetPublicKey: no token work


class Load(StrEnum):
    """The load generator of a CallRow."""

    PYTHON = "python"  # bench/load.py, grpcio clients
    H2LOAD = "h2load"  # nghttp2's h2load (bench/h2load.py)


@dataclass(frozen=True)
class TokenBracket:
    """The token limit measured right before and after a row (bench.run.Bracket)."""

    ops_per_s: float
    p50_ms: float
    before: float | None = None
    after: float | None = None
    threads: int | None = None


@dataclass(kw_only=True)
class Row:
    """What every row has: a name for people, why it measured nothing (if so), and the
    measurement's details that no target reads (kept in results.json)."""

    name: str
    not_available: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        return self.not_available is None

    def to_json(self) -> dict[str, Any]:
        return {"kind": type(self).__name__, **dataclasses.asdict(self)}


@dataclass(kw_only=True)
class RateRow(Row):
    """A row with a rate and latencies."""

    ops_per_s: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    cores: float | None = None


@dataclass(kw_only=True)
class PhysicalRow(RateRow):
    """OpenSSL in-process on every core: the machine's limit."""

    bits: int
    threads: int


@dataclass(kw_only=True)
class TokenRow(RateRow):
    """python-pkcs11 in-process on the token: the token limit the ratios use."""

    bits: int
    threads: int
    #: Signatures/s per thread count tried.
    sweep: dict[str, float] = field(default_factory=dict)
    #: Measured again after the daemon rows (the machine's speed drifts).
    after_daemon: bool = False


@dataclass(kw_only=True)
class TokenPacedRow(RateRow):
    """The token alone at the paced rows' rate: queueing on the token's own cores."""

    bits: int
    threads: int
    rate: float


@dataclass(kw_only=True)
class CallRow(RateRow):
    """Calls to a gRPC server under a load generator."""

    server: Server
    #: hsmsignd's bench.setup.DaemonSettings.describe(); for other servers what they are.
    settings: str = ""
    call: Call
    callers: int
    load: Load
    bits: int = 2048
    #: Digests per SignDigests call (1 for the other calls).
    batch: int = 1
    paced: bool = False
    #: Calls/s of a paced row's schedule.
    rate: float | None = None
    #: 1 for the main rows; 2.. for the rounds the median targets read.
    round: int = 1
    calls_per_s: float = 0.0
    client_cores: float | None = None
    token_bracket: TokenBracket | None = None
    #: The p99 floor rows: the token's own latencies while it signed beside the calls.
    token_p50_ms: float | None = None
    token_p99_ms: float | None = None

    @property
    def signs_nothing(self) -> bool:
        return self.call in (Call.HEALTH, Call.FLOOR) or self.server is Server.NOOP


@dataclass(frozen=True)
class Slice:
    """One daemon slice of part 3c (bench.slices): its rate, the kept-up token probe right
    before and right after it, and what it cost."""

    #: Which pair of slices (one per daemon) this one belongs to, from 0.
    pair: int
    #: Signatures inside the window (a call straddling its edge counted by its overlap) / s.
    ops_per_s: float
    probe_before: float
    probe_after: float
    #: ops_per_s over the mean of the two probes.
    ratio: float
    #: Calls that started inside the window; every signature the slice made, the calls
    #: started after the window (to keep the concurrency until those end) included.
    calls: int
    signed: int
    #: The window and the drain of the calls still in flight when it closed.
    wall_seconds: float
    daemon_cpu_seconds: float
    client_cpu_seconds: float
    p50_ms: float | None = None
    #: The daemon's CPU inside the window (read by the load driver as it opens and closes).
    daemon_window_cpu_seconds: float | None = None
    #: The probes' CPU per signature (the mean of the two) over the daemon's inside the
    #: window: under 1 when the daemon spends more CPU on a signature than the token alone.
    cpu_ratio: float | None = None
    #: Cores the daemon used inside the window over cores the probes used (the mean of the
    #: two): under 1 when the daemon leaves CPU idle that the probe uses (or the host's other
    #: work took more of it). ratio is about cpu_ratio x core_ratio.
    core_ratio: float | None = None


@dataclass(kw_only=True)
class SlicedRow(CallRow):
    """A daemon's batch load in short slices that alternate with a kept-up token probe
    (bench.slices): the figure is the median of the slices' ratios to the probes around
    each, with their quartiles."""

    slices: list[Slice] = field(default_factory=list)
    slice_seconds: float = 0.0
    probe_seconds: float = 0.0
    ratio_q1: float | None = None
    ratio_median: float | None = None
    ratio_q3: float | None = None
    #: Quartiles of the slices' cpu_ratio and core_ratio.
    cpu_ratio_q1: float | None = None
    cpu_ratio_median: float | None = None
    cpu_ratio_q3: float | None = None
    core_ratio_q1: float | None = None
    core_ratio_median: float | None = None
    core_ratio_q3: float | None = None


@dataclass(kw_only=True)
class BundleRow(Row):
    """One tool encrypting one bundle file (bench/bench_bundle_encrypt.py)."""

    tool: str  # hsmsign, openssl or capgo
    size_mb: int
    seconds: float | None = None
    mb_per_s: float | None = None
    peak_rss_mb: float | None = None
    startup_seconds: float | None = None


AnyRow = PhysicalRow | TokenRow | TokenPacedRow | CallRow | SlicedRow | BundleRow
