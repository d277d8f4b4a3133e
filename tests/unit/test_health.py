"""server.health: the serving process's statuses from its conditions."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health, health_pb2

from server.health import Health

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(servicer: health.HealthServicer, name: str) -> int:
    req = health_pb2.HealthCheckRequest(service=name)
    return int(servicer.Check(req, None).status)


@pytest.mark.parametrize("key_admin", [True, False])
def test_serving_only_once_started_and_while_every_condition_holds(key_admin: bool) -> None:
    servicer = health.HealthServicer()
    h = Health(servicer, key_admin)
    assert _status(servicer, "hsmsign.v1.Signer") == NOT_SERVING  # not started yet
    h.start()
    assert _status(servicer, "") == _status(servicer, "hsmsign.v1.Signer") == SERVING
    assert _status(servicer, "hsmsign.v1.KeyAdmin") == (SERVING if key_admin else NOT_SERVING)
    h.set("token", False, "DeviceError during signing")
    h.set("audit", False, "cannot write the trail")
    assert _status(servicer, "hsmsign.v1.Signer") == NOT_SERVING
    assert _status(servicer, "hsmsign.v1.KeyAdmin") == NOT_SERVING
    h.set("token", True)
    assert _status(servicer, "hsmsign.v1.Signer") == NOT_SERVING  # the trail still fails
    h.set("audit", True)
    assert _status(servicer, "hsmsign.v1.Signer") == SERVING
    assert h.serving


def test_an_unknown_condition_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown health condition"):
        Health(health.HealthServicer(), True).set("disk", False)
