"""ScheduleKeyVersionDestruction's delay: bounded above (a huge one was INTERNAL), and a
minimum that has a 24 h floor only a loudly named development setting lowers."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.conftest import Daemon, TokenDir, hsmsignd, start_daemon, write_config

#: The largest google.protobuf.Duration (10,000 years), an int64 beyond it, and 11 years.
HUGE = [315_576_000_000, 2**63 - 1, 11 * 366 * 86400]


@pytest.mark.parametrize("seconds", HUGE, ids=["duration-max", "int64-max", "11-years"])
def test_huge_delay_is_invalid_argument(daemon: Daemon, seconds: int) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        admin = pb_grpc.KeyAdminStub(channel)
        request = pb.ScheduleDestructionRequest(
            name="demo", version=1, delay=Duration(seconds=seconds)
        )
        with pytest.raises(grpc.RpcError) as e:
            admin.ScheduleKeyVersionDestruction(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "delay must be at most 3650 days" in (e.value.details() or "")
        # and the daemon still serves
        assert admin.GetKey(pb.GetKeyRequest(name="demo"), timeout=30).name == "demo"


def test_negative_delay_is_invalid_argument(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        admin = pb_grpc.KeyAdminStub(channel)
        for d in (Duration(seconds=-(2**62)), Duration(seconds=0, nanos=-5)):
            request = pb.ScheduleDestructionRequest(name="demo", version=1, delay=d)
            with pytest.raises(grpc.RpcError) as e:
                admin.ScheduleKeyVersionDestruction(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()


LOUD = "dev_unsafe_allow_short_destruction_delay"


@pytest.mark.parametrize("hours", [0, 23.5])
def test_minimum_below_24_hours_needs_the_loud_setting(
    token: TokenDir, tmp_path: Path, hours: float
) -> None:
    cfg = write_config(
        tmp_path / "c.toml", token, extra=f"[keyring]\nmin_destruction_delay_hours = {hours}\n"
    )
    r = hsmsignd(cfg, "keys", "list", check=False, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert f"keyring.min_destruction_delay_hours: got {hours}" in r.stderr
    assert f"below the floor of 24 hours; only {LOUD} = true" in r.stderr


def test_loud_setting_lowers_the_floor_with_a_warning(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml",
        token,
        extra=f"[keyring]\nmin_destruction_delay_hours = 0\n{LOUD} = true\n",
    )
    d = start_daemon(cfg, tmp_path / "d")
    try:
        log = d.wait_log(LOUD)
        warnings = [ln for ln in log.splitlines() if " WARNING " in ln and LOUD in ln]
        assert len(warnings) == 1, d.log()
        assert "minimum destruction delay is 0 hours" in warnings[0]
    finally:
        d.stop()
    # The setting alone, with a minimum at the floor, is no warning and no error.
    cfg.write_text(cfg.read_text().replace("min_destruction_delay_hours = 0", ""))
    r = hsmsignd(cfg, "keys", "list", timeout=60)
    assert LOUD not in r.stderr


def test_minimum_above_the_floor_needs_nothing(token: TokenDir, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "c.toml", token, extra="[keyring]\nmin_destruction_delay_hours = 48\n"
    )
    r = hsmsignd(cfg, "keys", "list", timeout=60)
    assert "WARNING" not in r.stderr
