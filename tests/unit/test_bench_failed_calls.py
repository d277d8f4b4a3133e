"""The bench counts failed calls from the daemon's access log; a caller that went away
(h2load resetting its streams at the end of a run) is not a failure of the daemon."""

from __future__ import annotations

from bench.h2load import failed_calls

LOG = """\
2026-12-02T02:00:00.000Z SignDigest peer=ipv4:127.0.0.1:1 status=OK key=demo@1 ms=1.0
2026-12-02T02:00:00.001Z SignDigest peer=ipv4:127.0.0.1:2 status=CANCELLED key=- ms=0.1
2026-12-02T02:00:00.002Z SignDigest peer=ipv4:127.0.0.1:3 status=UNAVAILABLE key=- ms=0.1
2026-12-02T02:00:00.003Z GetPublicKey peer=ipv4:127.0.0.1:4 status=NOT_FOUND key=- ms=0.1
"""


def test_only_the_daemons_failures_count() -> None:
    assert failed_calls(LOG, "SignDigest") == {"UNAVAILABLE": 1}
    assert failed_calls(LOG, "GetPublicKey") == {"NOT_FOUND": 1}
