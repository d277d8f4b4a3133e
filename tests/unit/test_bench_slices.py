"""Part 3c's sliced measurement (bench/slices.py): a batch call that straddles a slice's
window counts by its overlap with it, so the window's edges bias nothing; each slice is
read against the token probes right before and after it; the audit target is the median of
the audit-on slices' ratios (bench/report.py)."""

from __future__ import annotations

import pytest

from bench.report import pair_quotients, targets
from bench.rows import AnyRow, Call, Load, Server, Slice, SlicedRow
from bench.setup import DaemonSettings
from bench.slices import Span, balanced, counted, quartiles, slice_ratios, slice_seconds


def _closed_loop(call_seconds: float, items: int, until: float, offset: float = 0.0) -> list[Span]:
    """One caller's back-to-back calls from ``offset`` on, each ``call_seconds`` long."""
    spans, t = [], offset
    while t < until:
        spans.append(Span(t, t + call_seconds, items))
        t += call_seconds
    return spans


def test_a_call_counts_by_its_overlap_with_the_window() -> None:
    window = (10.0, 12.0)
    assert counted([Span(10.5, 11.5, 256)], *window) == 256  # inside: whole
    assert counted([Span(9.0, 13.0, 256)], *window) == pytest.approx(128)  # spans it: 2 of 4 s
    assert counted([Span(9.5, 10.5, 100)], *window) == pytest.approx(50)  # straddles the start
    assert counted([Span(11.75, 12.75, 100)], *window) == pytest.approx(25)  # straddles the end
    assert counted([Span(8.0, 10.0, 100), Span(12.0, 13.0, 100)], *window) == 0  # outside
    assert counted([Span(11.0, 11.0, 1), Span(12.5, 12.5, 1)], *window) == 1  # no duration


@pytest.mark.parametrize("offset", [0.05, 0.1, 0.23, 0.37])
@pytest.mark.parametrize("stagger", [0.0, 0.1])
def test_a_steady_rate_reads_the_same_wherever_the_window_falls(
    offset: float, stagger: float
) -> None:
    """4 callers with 0.4 s calls of 256 signatures make 2,560 signatures/s, in step (as
    they start a slice) or staggered. Counting the calls that end inside a 1.5 s window
    would read 2,048 or 2,731 by where its edges fall; counting by overlap reads 2,560 for
    any phase of the calls."""
    spans = [s for c in range(4) for s in _closed_loop(0.4, 256, 5.0, offset + c * stagger)]
    assert counted(spans, 2.0, 3.5) / 1.5 == pytest.approx(2560)
    # With 1 s calls (a busy host) a 1.5 s window holds one or two ends per caller.
    slow = [s for c in range(4) for s in _closed_loop(1.0, 256, 6.0, offset + c * stagger)]
    assert counted(slow, 2.0, 3.5) / 1.5 == pytest.approx(1024)


def test_each_slice_is_read_against_the_probes_around_it() -> None:
    # probe 1,000, slice 1,100, probe 1,200, slice 900, probe 800
    assert slice_ratios([1000, 1200, 800], [1100, 900]) == pytest.approx([1.0, 0.9])
    with pytest.raises(ValueError, match="2 slices need 3 probes"):
        slice_ratios([1000, 1200], [1100, 900])


def test_quartiles() -> None:
    assert quartiles([]) is None
    assert quartiles([0.9]) == (0.9, 0.9, 0.9)
    assert quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((2.0, 3.0, 4.0))


def _slice(pair: int, ratio: float) -> Slice:
    return Slice(
        pair=pair,
        ops_per_s=1000 * ratio,
        probe_before=1000,
        probe_after=1000,
        ratio=ratio,
        calls=12,
        signed=3072,
        wall_seconds=2.0,
        daemon_cpu_seconds=2.0,
        client_cpu_seconds=0.01,
    )


def _row(audit: bool, ratios: list[float]) -> SlicedRow:
    q = quartiles(ratios)
    assert q is not None
    return SlicedRow(
        name=f"audit {audit}",
        server=Server.HSMSIGND,
        settings=DaemonSettings(audit=audit).describe(),
        call=Call.BATCH,
        callers=4,
        load=Load.PYTHON,
        batch=256,
        slices=[_slice(k, r) for k, r in enumerate(ratios)],
        slice_seconds=1.5,
        probe_seconds=1.0,
        ratio_q1=q[0],
        ratio_median=q[1],
        ratio_q3=q[2],
        details={"probes": [900.0, 1100.0]},
    )


def test_the_audit_target_is_the_median_of_the_audit_on_slices() -> None:
    on = [0.90, 0.97, 0.93, 1.02, 0.94]
    off = [1.00, 0.97, 1.00, 0.96, 0.94]
    rows: list[AnyRow] = [_row(True, on), _row(False, off)]
    by = {t["target"]: t for t in targets(rows)}
    t = by["batched signing, audit on / token limit"]
    assert by["batched signing / token limit"]["result"] == "NOT MEASURED"  # x64: not these
    assert (t["value"], t["result"]) == (0.94, "FAIL")
    assert "audit on median 0.940x (IQR 0.930-0.970)" in t["detail"]
    assert "audit off median 0.970x" in t["detail"]
    # per pair 0.90, 1.00, 0.93, 1.0625, 1.00
    assert "on / off per pair 1.000 (IQR 0.930-1.000)" in t["detail"]
    rows[0] = _row(True, [0.96, 0.95, 0.99, 0.90, 0.97])
    assert {t["target"]: t for t in targets(rows)}[t["target"]]["result"] == "PASS"


def test_on_over_off_is_taken_per_pair() -> None:
    on = [_slice(0, 0.9), _slice(1, 1.2), _slice(3, 1.0)]
    off = [_slice(0, 1.0), _slice(1, 1.0), _slice(2, 0.8)]  # pair 2's on and 3's off failed
    assert pair_quotients(on, off) == pytest.approx([0.9, 1.2])


@pytest.mark.parametrize(
    ("split", "connections", "processes", "expected"),
    [
        ([2, 2], 4, 2, True),
        ([3, 1], 4, 2, False),  # one process does three callers' work
        ([4], 4, 2, False),  # the other process idle
        ([4], 4, 1, True),  # one serving process: nothing to balance
        ([1, 1], 2, 4, True),  # fewer connections than processes
        ([2, 1], 4, 2, False),  # a connection not seen on any process
        ([2, 1, 1], 4, 3, True),
    ],
)
def test_a_split_is_balanced_when_it_uses_every_process_it_can_evenly(
    split: list[int], connections: int, processes: int, expected: bool
) -> None:
    assert balanced(split, connections, processes) is expected


def test_a_kept_up_child_is_told_run_seconds_or_quit() -> None:
    assert slice_seconds("run 1.5\n") == 1.5
    assert slice_seconds("quit\n") is None
    assert slice_seconds("") is None  # stdin closed: the bench went away
    with pytest.raises(ValueError, match="unknown command 'walk 1'"):
        slice_seconds("walk 1\n")
