"""[server.limits]: the documented example states the defaults, and the server options
carry every value."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from server import config
from server.api import admission, limits
from server.errors import ConfigError
from server.limitsconfig import ConnectionLimits

EXAMPLE = Path(__file__).resolve().parents[2] / "hsm_config" / "production.example.toml"


def test_example_config_lists_every_limit_with_its_default() -> None:
    example = tomllib.loads(EXAMPLE.read_text())["server"]["limits"]
    defaults = dataclasses.asdict(ConnectionLimits())
    assert example == defaults


def test_server_options_carry_the_limits_in_milliseconds() -> None:
    options = dict(limits.server_options(ConnectionLimits(max_connection_idle_seconds=1.5), False))
    assert options["grpc.max_receive_message_length"] == 1024 * 1024
    assert options["grpc.max_connection_idle_ms"] == 1500
    assert options["grpc.max_connection_age_ms"] == 1_800_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.so_reuseport"] == 0


def _config(tmp_path: Path, server: str) -> Path:
    pin = tmp_path / "pin"
    pin.write_text("1234")
    pin.chmod(0o600)
    path = tmp_path / "c.toml"
    path.write_text(
        f'[token]\nmodule = "/nonexistent/p11-kit-proxy.so"\nlabel = "t"\nsessions = 2\n'
        f'pin_file = "{pin}"\n[server]\nprocesses = 1\nthreads = 4\n{server}'
    )
    return path


def test_grpc_bound_must_be_above_the_threads_admission_may_hold(tmp_path: Path) -> None:
    """gRPC's maximum_concurrent_rpcs refuses with no log line or audit record: it must never
    refuse a call that hsmsignd's own queue has room for."""
    # server.threads (4) + token.sessions (2) + max_queued_calls (64): a thread for each
    # place, no more: a call being received holds no thread (docs/adr/0008).
    low = "max_concurrent_calls = 70\n[server.limits]\nmax_queued_calls = 64\n"
    with pytest.raises(ConfigError, match=r"max_concurrent_calls: got 70; allowed: above .*\(70\)"):
        config.load(_config(tmp_path, low))
    cfg = config.load(_config(tmp_path, low.replace("70", "71")))
    assert admission.serving_threads(cfg) == 70 < cfg.server.max_concurrent_calls
    controller = admission.controller_for(cfg)
    assert (controller.capacity, controller.places) == (2, 66)
