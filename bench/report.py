"""Targets, the printed table and the PNG chart for bench.run's results.

Rows are found by their fields (bench/rows.py), never by their display names or positions.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.rows import (
    AnyRow,
    BundleRow,
    Call,
    CallRow,
    Load,
    PhysicalRow,
    RateRow,
    Server,
    Slice,
    SlicedRow,
    TokenPacedRow,
    TokenRow,
)
from bench.slices import quartiles

LONG_RUN = Path(__file__).resolve().parent / "results" / "long_run.json"


def _calls(rows: list[AnyRow], **match: Any) -> list[CallRow]:
    """The CallRows whose fields equal ``match``, in run order."""
    return [
        r
        for r in rows
        if isinstance(r, CallRow) and all(getattr(r, k) == v for k, v in match.items())
    ]


def _find(rows: list[AnyRow], **match: Any) -> CallRow | None:
    """The first main-round CallRow whose fields equal ``match``."""
    found = _calls(rows, round=1, **match)
    return found[0] if found else None


def _ok(r: CallRow | None) -> CallRow | None:
    """A row that measured something, else None (a failed row counts as not measured)."""
    return r if r is not None and r.measured else None


def _target(
    name: str, value: float | None, goal: float, unit: str, higher: bool, why: str
) -> dict[str, Any]:
    if value is None:
        return {
            "target": name,
            "value": None,
            "goal": goal,
            "result": "NOT MEASURED",
            "detail": why,
        }
    ok = value >= goal if higher else value <= goal
    return {
        "target": name,
        "value": round(value, 3),
        "goal": goal,
        "unit": unit,
        "result": "PASS" if ok else "FAIL",
        "detail": why,
    }


#: The rows each target reads (with settings=the default daemon, bits=2048).
BATCH: dict[str, Any] = {"server": Server.HSMSIGND, "call": Call.BATCH, "callers": 4, "batch": 64}
#: bench.run.audit_rows: SignDigests x256 with the audit trail on, and off beside it.
AUDIT_BATCH: dict[str, Any] = {"server": Server.HSMSIGND, "call": Call.BATCH, "batch": 256}
#: bench.run.audit_rows: unary SignDigest with the audit trail on, and off beside it.
AUDIT_UNARY: dict[str, Any] = {"server": Server.HSMSIGND, "call": Call.UNARY, "callers": 16}
UNARY_64: dict[str, Any] = {
    "server": Server.HSMSIGND,
    "call": Call.UNARY,
    "callers": 64,
    "paced": False,
}
PACED: dict[str, Any] = {"server": Server.HSMSIGND, "call": Call.UNARY, "paced": True}
BARE_UNARY: dict[str, Any] = {"server": Server.BARE, "call": Call.UNARY, "paced": False}
BARE_PACED: dict[str, Any] = {"server": Server.BARE, "call": Call.UNARY, "paced": True}


def targets(rows: list[AnyRow]) -> list[dict[str, Any]]:
    """The issue's targets, each as a ratio of two rows from the same run."""
    out = []
    tok = token_reference(rows)
    tok_rate = tok["ops_per_s"] if tok else None
    default = {"settings": _default(), "bits": 2048}
    batch = _find(rows, **BATCH, **default)
    # The unary target reads the h2load row when h2load ran: a C load generator takes
    # about a tenth of the CPU per call the Python client takes from the same 2 cores.
    u64_py = _find(rows, **UNARY_64, **default, load=Load.PYTHON)
    u64 = _find(rows, **UNARY_64, **default, load=Load.H2LOAD)
    u64 = u64 if u64 and u64.measured else u64_py
    paced_py = _find(rows, **PACED, **default, load=Load.PYTHON)
    paced = _find(rows, **PACED, **default, load=Load.H2LOAD)
    paced = paced if paced and paced.measured else paced_py

    def ratio(r: CallRow | None) -> float | None:
        ref = _reference(r, tok_rate)
        return r.ops_per_s / ref if r and ref else None

    batch_rounds = [h for h, _b in _rounds(rows, {**BATCH, **default}, None, ratio)]
    out.append(
        _target(
            "batched signing / token limit",
            _median(batch_rounds) if len(batch_rounds) > 1 else ratio(batch),
            0.95,
            "x",
            True,
            "SignDigests, 64 digests per call, RSA-2048"
            + (
                f"; median of {len(batch_rounds)} rounds: " + _series(batch_rounds)
                if len(batch_rounds) > 1
                else ""
            ),
        )
    )
    unary_rounds = (
        _rounds(rows, {**UNARY_64, **default, "load": Load.H2LOAD}, BARE_UNARY, ratio)
        if u64 is not u64_py
        else []
    )
    out.append(
        _target(
            "unary at 64 callers / token limit",
            _median([h for h, _b in unary_rounds]) if len(unary_rounds) > 1 else ratio(u64),
            0.80,
            "x",
            True,
            f"SignDigest, RSA-2048, load from {u64.load if u64 else '-'}"
            + (
                f" (Python clients: {ratio(u64_py):.2f}x)"
                if u64 is not u64_py and ratio(u64_py) is not None
                else ""
            )
            + _unary_ceiling(rows, tok, u64)
            + (
                _rounds_text(unary_rounds, "{:.2f}x", "reaches")
                if len(unary_rounds) > 1
                else _bare_unary(rows, u64, ratio)
            ),
        )
    )
    p99 = paced.p99_ms if paced else None
    tok_p50 = (
        paced.token_bracket.p50_ms
        if paced and paced.token_bracket
        else tok["p50_ms"]
        if tok
        else None
    )
    py = (
        f" (Python clients: p99 {paced_py.p99_ms:.2f} ms)"
        if paced is not paced_py and paced_py and paced_py.p99_ms
        else ""
    )
    alone = next((r for r in rows if isinstance(r, TokenPacedRow)), None)
    if alone and alone.p99_ms:
        py += f"; the token alone at that rate: p99 {alone.p99_ms:.2f} ms"
    bare = _find(rows, **BARE_PACED)

    def p99_ratio(r: CallRow | None) -> float | None:
        """A paced row's p99 over the token p50 measured around it."""
        if not r or not r.p99_ms or not r.measured:
            return None
        p50 = r.token_bracket.p50_ms if r.token_bracket else tok_p50
        return r.p99_ms / p50 if p50 else None

    p99_rounds = (
        _rounds(rows, {**PACED, **default, "load": Load.H2LOAD}, BARE_PACED, p99_ratio)
        if paced is not paced_py
        else []
    )
    if len(p99_rounds) > 1:
        py += _rounds_text(p99_rounds, "{:.2f}x", "at that rate")
    elif bare and bare.p99_ms and bare.measured:
        bare_p50 = bare.token_bracket.p50_ms if bare.token_bracket else tok_p50
        py += f"; the bare stack (no hsmsign code) at that rate: p99 {bare.p99_ms:.2f} ms" + (
            f" = {bare.p99_ms / bare_p50:.2f}x" if bare_p50 else ""
        )
    out.append(
        _target(
            "p99 at half max unary / token p50",
            _median([h for h, _b in p99_rounds])
            if len(p99_rounds) > 1
            else p99 / tok_p50
            if p99 and tok_p50
            else None,
            3.0,
            "x",
            False,
            f"p99 {p99 or 0:.2f} ms vs token p50 {tok_p50 or 0:.3f} ms per op, load from "
            f"{paced.load if paced else '-'}{py}" + _floor_text(rows, 3.0),
        )
    )
    out.append(_audit_target(rows))
    out += _bundle_targets(rows)
    out.append(_rss_target())
    return out


def _audit_target(rows: list[AnyRow]) -> dict[str, Any]:
    """Batch signing with the audit trail on over the token limit: the median of
    bench.run.sliced_audit_rows' slices, each against the kept-up token probe right before
    and after it, with the same daemon's figure with audit off beside it and the on / off
    quotient of each pair of slices: the issue's ">= 95% of the token limit with audit on"."""
    from bench.setup import DaemonSettings

    on_settings = DaemonSettings(audit=True).describe()

    def sliced(settings: str) -> SlicedRow | None:
        found = [
            r
            for r in rows
            if isinstance(r, SlicedRow)
            and r.settings == settings
            and all(getattr(r, k) == v for k, v in AUDIT_BATCH.items())
        ]
        return found[0] if found else None

    on, off = sliced(on_settings), sliced(_default())
    detail = "SignDigests x256, 4 callers, RSA-2048, [audit] on (fsync before every answer)"
    if on is None:
        detail = "no sliced batch audit rows in this run"
    else:
        detail += (
            f"; {len(on.slices)} slices of {on.slice_seconds:g} s per daemon alternating with "
            f"a {on.probe_seconds:g} s token probe, both kept up; each slice over the mean of "
            f"the probes around it: audit on {_iqr(on)}"
        )
        if not on.measured:
            detail += f" ({on.not_available})"
    if off is not None:
        detail += f", audit off {_iqr(off)}"
        if not off.measured:
            detail += f" ({off.not_available})"
    if on is not None and off is not None:
        q = quartiles(pair_quotients(on.slices, off.slices))
        if q:
            detail += f"; on / off per pair {q[1]:.3f} (IQR {q[0]:.3f}-{q[2]:.3f})"
        parts = [
            f"{label} {r.cpu_ratio_median:.3f} x {r.core_ratio_median:.3f}"
            for r, label in ((on, "on"), (off, "off"))
            if r.cpu_ratio_median is not None and r.core_ratio_median is not None
        ]
        if parts:
            detail += (
                "; in the slices' windows (medians), the probe's CPU per signature over the "
                "daemon's x the daemon's cores over the probe's: " + ", ".join(parts)
            )
        probes = [*on.details.get("probes", [])]
        if probes:
            detail += f"; token probe {min(probes):,.0f}-{max(probes):,.0f} sig/s"
    detail += _audit_unary(rows, on_settings)
    return _target(
        "batched signing, audit on / token limit",
        on.ratio_median if on is not None and on.measured else None,
        0.95,
        "x",
        True,
        detail,
    )


def _iqr(r: SlicedRow) -> str:
    """A sliced row's median ratio and its interquartile range."""
    if r.ratio_median is None:
        return "-"
    return f"median {r.ratio_median:.3f}x (IQR {r.ratio_q1 or 0:.3f}-{r.ratio_q3 or 0:.3f})"


def pair_quotients(on: list[Slice], off: list[Slice]) -> list[float]:
    """Audit on over audit off, each slice's ratio to its own probes, per pair of slices
    (a pair whose slice on either side failed is left out)."""
    by_pair = {s.pair: s.ratio for s in off}
    return [s.ratio / by_pair[s.pair] for s in on if by_pair.get(s.pair)]


def _audit_unary(rows: list[AnyRow], on_settings: str) -> str:
    """What audit costs a single call: unary SignDigest at 16 callers, audit on over off in
    each round of bench.run.audit_rows (no goal: every call waits for its record's fsync)."""

    def per_round(settings: str) -> dict[int, float]:
        found = _calls(rows, **AUDIT_UNARY, settings=settings)
        return {r.round: r.calls_per_s for r in found if "audit" in r.name and _ok(r)}

    on, off = per_round(on_settings), per_round(_default())
    shares = [on[k] / off[k] for k in sorted(on) if off.get(k)]
    if not shares:
        return ""
    return (
        f"; unary SignDigest x{AUDIT_UNARY['callers']} callers, audit on / off per round "
        f"{_series(list(shares))}, median {_median(list(shares)):.2f}"
    )


def _reference(r: RateRow | None, tok_rate: float | None) -> float | None:
    """The token limit a row is compared with: measured right around it when the run did
    (bench.run.Bracket), else the run's token reference."""
    if isinstance(r, CallRow) and r.token_bracket:
        return r.token_bracket.ops_per_s
    return tok_rate


def _unary_ceiling(rows: list[AnyRow], tok: dict[str, Any] | None, unary: CallRow | None) -> str:
    """The best unary share this machine allows, from the run's own per-call costs.

    Token, daemon and load generator share the same cores. Per signature the token needs
    ``1 / (sig per CPU-second)``; per call, gRPC and the daemon's Python (the GetPublicKey
    floor row: no token work) and the client cost their CPU on top. With all cores busy the
    unary rate is at most token_cpu / (token_cpu + daemon_call_cpu + client_call_cpu) of the
    token limit.
    """
    load = unary.load if unary else Load.PYTHON
    hsmsignd = {"server": Server.HSMSIGND, "settings": _default(), "load": load}
    floor = _find(rows, call=Call.FLOOR, **hsmsignd)
    if not tok or not floor or not floor.calls_per_s or not tok.get("cores"):
        return ""
    if floor.cores is None or floor.client_cores is None:
        return ""
    # CPU per signature of the token alone, at the speed the machine had around the row.
    token_cpu = tok["cores"] / (_reference(unary, tok["ops_per_s"]) or tok["ops_per_s"])
    daemon_cpu = floor.cores / floor.calls_per_s
    client_cpu = floor.client_cores / floor.calls_per_s
    ceiling = token_cpu / (token_cpu + daemon_cpu + client_cpu)
    text = (
        f"; ceiling here {ceiling:.2f}x: per call token {token_cpu * 1000:.2f} ms CPU + "
        f"gRPC/daemon {daemon_cpu * 1000:.2f} ms + client {client_cpu * 1000:.2f} ms"
    )
    # The same bound with none of hsmsign's code: grpcio serving the health check.
    alone = _find(rows, call=Call.HEALTH, **hsmsignd)
    if alone and alone.calls_per_s and alone.cores and alone.client_cores is not None:
        grpc_cpu = alone.cores / alone.calls_per_s
        grpc_client = alone.client_cores / alone.calls_per_s
        bound = token_cpu / (token_cpu + grpc_cpu + grpc_client)
        text += (
            f"; with grpcio alone ({grpc_cpu * 1000:.2f} ms per call, no hsmsign code) "
            f"the bound is {bound:.2f}x"
        )
    return text


def _bare_unary(
    rows: list[AnyRow],
    unary: CallRow | None,
    ratio: Callable[[CallRow | None], float | None],
) -> str:
    """The bare stack's share under the same load (bench/bare_server.py), and hsmsign's share
    of it: the first is what grpcio and python-pkcs11 allow here, the second hsmsign's part."""
    bare = _find(rows, **BARE_UNARY)
    if not bare or not bare.measured or not unary or unary.load != Load.H2LOAD:
        return ""
    b, u = ratio(bare), ratio(unary)
    if not b or not u:
        return ""
    return f"; the bare stack (no hsmsign code) reaches {b:.2f}x, hsmsign {u / b:.2f} of that"


def _rounds(
    rows: list[AnyRow],
    hsmsignd: dict[str, Any],
    bare: dict[str, Any] | None,
    value: Callable[[CallRow | None], float | None],
) -> list[tuple[float | None, float | None]]:
    """(hsmsignd, bare stack) per round: the rows matching ``hsmsignd`` and ``bare`` (None
    for the batch target, which has no bare stack row), round 1 being the run's main rows
    and 2.. bench.run's round rows. A failed row counts as not measured."""

    def of(match: dict[str, Any] | None, k: int) -> CallRow | None:
        found = _calls(rows, round=k, **match) if match is not None else []
        return _ok(found[0]) if found else None

    numbers = sorted({r.round for r in _calls(rows, **hsmsignd)} | {1})
    return [(value(of(hsmsignd, k)), value(of(bare, k))) for k in numbers]


def p99_floor(rows: list[AnyRow]) -> list[float]:
    """Per round of bench.run.p99_floor_rows: the p99 of a gRPC call that signs nothing,
    made while the token signs as often beside it, over the token p50 measured around it.
    A signing call goes through the same and waits for its signature on top."""
    out = []
    for r in _calls(rows, server=Server.NOOP):
        if not r.measured or not r.p99_ms or r.token_bracket is None:
            continue
        if r.token_bracket.p50_ms:
            out.append(r.p99_ms / r.token_bracket.p50_ms)
    return out


def _floor_text(rows: list[AnyRow], goal: float) -> str:
    values = p99_floor(rows)
    m = _median(list(values))
    if m is None:
        return ""
    series = _series(list(values))
    text = (
        f"; the p99 floor (gRPC alone, no signing, paced at that rate while the token signs "
        f"as often in another process): {series}, median {m:.2f}x"
    )
    return text + (": above the goal before any signing is in the call" if m > goal else "")


def _series(values: list[float | None], fmt: str = "{:.2f}x") -> str:
    """Per-round figures as the targets print them; "-" for a round not measured."""
    return " / ".join("-" if v is None else fmt.format(v) for v in values)


def _median(values: list[float | None]) -> float | None:
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def _rounds_text(rounds: list[tuple[float | None, float | None]], fmt: str, verb: str) -> str:
    """The rounds behind a median target: hsmsignd's and the bare stack's value per round,
    and hsmsignd's value over the bare stack's (the median of the rounds' own quotients)."""

    ours, bare = [h for h, _b in rounds], [b for _h, b in rounds]
    text = f"; median of {len(rounds)} interleaved rounds: hsmsignd {_series(ours, fmt)}"
    bare_median = _median(bare)
    if bare_median is not None:
        text += (
            f"; the bare stack (no hsmsign code) {verb} {_series(bare, fmt)}, "
            f"median {fmt.format(bare_median)}"
        )
        quotient = _median([h / b for h, b in rounds if h is not None and b])
        if quotient is not None:
            text += f"; hsmsignd / bare stack {quotient:.2f} (median of the rounds)"
    return text


def token_reference(rows: list[AnyRow]) -> dict[str, Any] | None:
    """The token limit the targets use: the mean of the RSA-2048 token measurements (taken
    before and after the daemon rows, since the shared machine's load drifts)."""
    toks = [r for r in rows if isinstance(r, TokenRow) and r.bits == 2048]
    if not toks:
        return None
    return {
        "ops_per_s": sum(r.ops_per_s for r in toks) / len(toks),
        "p50_ms": sum(r.p50_ms or 0.0 for r in toks) / len(toks),
        "cores": sum(r.cores or 0.0 for r in toks) / len(toks),
    }


def _default() -> str:
    from bench.setup import DaemonSettings

    return DaemonSettings().describe()


def _bundle_targets(rows: list[AnyRow]) -> list[dict[str, Any]]:
    """Rows from bench_bundle_encrypt: tool in hsmsign/openssl/capgo, size_mb, mb_per_s."""
    out = []
    bundles = [r for r in rows if isinstance(r, BundleRow)]
    sizes = sorted({r.size_mb for r in bundles if r.measured})
    if not sizes:
        return [
            _target(
                "bundle encryption / openssl",
                None,
                0.9,
                "x",
                True,
                "no bundle rows in this run",
            )
        ]
    for size in sizes:
        by = {r.tool: r.mb_per_s for r in bundles if r.size_mb == size and r.mb_per_s}
        h, o, c = by.get("hsmsign"), by.get("openssl"), by.get("capgo")
        out.append(
            _target(
                f"bundle encrypt {size:g} MB / openssl",
                h / o if h and o else None,
                0.9,
                "x",
                True,
                "hsmsign bundle encrypt",
            )
        )
        out.append(
            _target(
                f"bundle encrypt {size:g} MB / Capgo CLI",
                h / c if h and c else None,
                1.0,
                "x",
                True,
                "must be faster (> 1x)",
            )
        )
    return out


def _rss_target() -> dict[str, Any]:
    if not LONG_RUN.exists():
        return _target(
            "daemon RSS growth (make bench-long)", None, 20.0, "MB", False, "run make bench-long"
        )
    lr = json.loads(LONG_RUN.read_text())
    return _target(
        "daemon RSS growth (make bench-long)",
        lr["growth_mb"],
        20.0,
        "MB",
        False,
        f"{lr['calls']:,} calls on {lr['date']} (from {LONG_RUN.name})",
    )


def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _line(r: AnyRow, tok_rate: float | None) -> str:
    """One row of the printed table."""
    if not r.measured:
        return f"{r.name:<66} not available: {r.not_available}"
    if isinstance(r, BundleRow):
        return f"{r.name:<66} {_f(r.mb_per_s, '{:.0f} MB/s'):>15}"
    if isinstance(r, CallRow) and r.signs_nothing:
        beside = f" (the token beside it: p99 {r.token_p99_ms:.2f} ms)" if r.token_p99_ms else ""
        return (
            f"{r.name:<66} {r.calls_per_s:>7.0f} {'calls/s':>7} "
            f"{_f(r.p50_ms, '{:.2f}'):>7} {_f(r.p99_ms, '{:.2f}'):>7} "
            f"{_f(r.cores, '{:.2f}'):>7} "
            f"{_f(r.client_cores, '{:.2f}'):>7}{beside}"
        )
    ref = _reference(r, tok_rate)
    share = r.ops_per_s / ref if ref and r.bits == 2048 else None
    if isinstance(r, SlicedRow):
        share = r.ratio_median  # the median of its slices' ratios to the probes around each
    client = r.client_cores if isinstance(r, CallRow) else None
    return (
        f"{r.name:<66} {r.ops_per_s:>7.0f} {_f(share, '{:.2f}'):>7} "
        f"{_f(r.p50_ms, '{:.2f}'):>7} {_f(r.p99_ms, '{:.2f}'):>7} "
        f"{_f(r.cores, '{:.2f}'):>7} "
        f"{_f(client, '{:.2f}'):>7} "
        f"{_f(r.ops_per_s / r.cores if r.cores else None):>9}"
    )


def table(result: dict[str, Any], rows: list[AnyRow]) -> str:
    """The printed report: every row, the token reference, then the targets."""
    tok = token_reference(rows)
    tok_rate = tok["ops_per_s"] if tok else None
    lines = [
        f"hsmsign bench {result['date']} on {result['machine']['cpus']} CPUs "
        f"({result['machine']['note']}); {result['duration_per_config_s']} s per configuration",
        "",
        f"{'configuration':<66} {'sig/s':>7} {'/token':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'srv cpu':>7} {'cli cpu':>7} {'sig/cpu-s':>9}",
    ]
    lines += [_line(r, tok_rate) for r in rows]
    if tok:
        lines.append(
            f"{'token reference for the ratios (mean of the RSA-2048 token rows)':<66} "
            f"{tok_rate:>7.0f} {1.0:>7.2f} {tok['p50_ms']:>7.2f}"
        )
    lines += [
        "",
        "/token: daemon rows against the token limit measured just before and after each "
        "(2 threads, the mean); other rows against the token reference;",
        "sliced rows (part 3c): sig/s and /token are the medians over their slices, each slice "
        "against the token probe right before and after it;",
        "srv cpu: cores used by the daemon (or the in-process bench); cli cpu: cores used by "
        "the load generators;",
        "sig/cpu-s: signatures per CPU-second of the signer (load-independent efficiency)",
        "",
        "targets:",
    ]
    for t in result["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.2f}{t.get('unit', '')}"
        lines.append(
            f"  [{t['result']:^12}] {t['target']:<44} {v:>9} (goal "
            f"{'>=' if 'growth' not in t['target'] and 'p99' not in t['target'] else '<='}"
            f" {t['goal']:g}) {t['detail']}"
        )
    return "\n".join(lines)


def _colour(r: RateRow) -> str:
    if isinstance(r, PhysicalRow):
        return "tab:gray"
    if isinstance(r, TokenRow | TokenPacedRow):
        return "tab:orange"
    if isinstance(r, CallRow) and r.server is Server.BARE:
        return "tab:purple"
    return "tab:blue"


def chart(result: dict[str, Any], all_rows: list[AnyRow], path: Path) -> None:
    """Signatures/s and latencies per row as a PNG. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in all_rows if isinstance(r, RateRow) and r.ops_per_s and r.measured]
    names = [r.name for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(16, 0.45 * len(rows) + 2), sharey=True)
    ax1.barh(names, [r.ops_per_s for r in rows], color=[_colour(r) for r in rows])
    ax1.set_xlabel("signatures/s")
    ax1.invert_yaxis()
    y = range(len(rows))
    ax2.scatter([r.p50_ms or 0 for r in rows], y, label="p50", marker="o")
    ax2.scatter([r.p99_ms or 0 for r in rows], y, label="p99", marker="x")
    ax2.set_xscale("log")
    ax2.set_xlabel("latency per call, ms (log)")
    ax2.legend()
    fig.suptitle(f"hsmsign bench {result['date']} ({result['machine']['cpus']} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
