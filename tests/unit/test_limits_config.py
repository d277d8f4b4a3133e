"""[server.limits]: the documented example states the defaults, and the server options
carry every value."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from server.api import limits
from server.config import ConnectionLimits

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
