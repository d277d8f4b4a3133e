"""The call pipeline over a real gRPC channel: one status mapping, one access-log line per call,
drain refusals, and the stage table new stages plug into."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from hsmsign import auditlog
from server.api import pipeline
from server.audit import trail
from server.audit.config import AuditConfig
from server.errors import FailedPrecondition, InvalidArgument, ServerError
from server.policy import gate


class _Servicer:
    @pipeline.rpc
    def Echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        pipeline.note_key_used("demo", 3, "ab" * 32)
        if request == b"invalid":
            raise InvalidArgument("digest is 3 bytes; it must be 32")
        if request == b"precondition":
            raise FailedPrecondition("key 'demo' version 3 is disabled")
        if request == b"bug":
            raise RuntimeError("secret-looking detail 4711")
        return request


@contextlib.contextmanager
def _admit_everyone(*_args: Any) -> Iterator[None]:
    yield None


@pytest.fixture()
def open_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the other stages: the access stage lets every call through
    (the policy itself is tests/unit/test_policy.py's and tests/integration/'s)."""
    monkeypatch.setattr(gate, "admit", _admit_everyone)


@pytest.fixture()
def closed_channel() -> Iterator[grpc.Channel]:
    """The test service with no policy loaded in this process."""
    yield from _serve()


@pytest.fixture()
def channel(open_gate: None) -> Iterator[grpc.Channel]:
    yield from _serve()


def _serve() -> Iterator[grpc.Channel]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = _Servicer()
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(
        servicer.Echo
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Pipeline", {"Echo": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    server.stop(0)


def _call(channel: grpc.Channel, payload: bytes) -> Any:
    echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Pipeline/Echo")
    return echo(payload, timeout=10)


def test_with_no_policy_every_call_is_denied(closed_channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _call(closed_channel, b"hello")
    assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_a_call_answers_and_logs_one_line(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="hsmsign.access"):
        assert _call(channel, b"hello") == b"hello"
    lines = [r.getMessage() for r in caplog.records if r.name == "hsmsign.access"]
    assert len(lines) == 1
    assert lines[0].startswith("Echo peer=") and "status=OK key=demo@3" in lines[0]
    assert "hello" not in lines[0]


@pytest.mark.parametrize(
    ("payload", "code", "message"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "digest is 3 bytes; it must be 32"),
        (b"precondition", grpc.StatusCode.FAILED_PRECONDITION, "key 'demo' version 3 is disabled"),
    ],
)
def test_server_errors_become_their_status(
    channel: grpc.Channel,
    caplog: pytest.LogCaptureFixture,
    payload: bytes,
    code: grpc.StatusCode,
    message: str,
) -> None:
    with caplog.at_level(logging.INFO, logger="hsmsign.access"), pytest.raises(grpc.RpcError) as e:
        _call(channel, payload)
    assert e.value.code() is code and e.value.details() == message
    assert any(f"status={code.name}" in r.getMessage() for r in caplog.records)


def test_an_unexpected_error_is_internal_with_an_incident_id(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), pytest.raises(grpc.RpcError) as e:
        _call(channel, b"bug")
    assert e.value.code() is grpc.StatusCode.INTERNAL
    details = e.value.details() or ""
    assert details.startswith("internal error (incident ") and "4711" not in details
    incident = details.removeprefix("internal error (incident ").rstrip(")")
    assert any(incident in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_a_draining_process_refuses_new_calls(channel: grpc.Channel) -> None:
    try:
        assert pipeline.calls.drain(timeout=1)
        with pytest.raises(grpc.RpcError) as e:
            _call(channel, b"hello")
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (e.value.details() or "")
    finally:
        pipeline.calls.draining = False


def test_the_stages_are_named_in_order() -> None:
    names = [name for name, _stage in pipeline.STAGES]
    assert names == [
        "access_log",
        "status",
        "audit",
        "well_formed",
        "access",
        "deadline",
        "admission",
    ]
    assert issubclass(InvalidArgument, ServerError)


def test_a_call_refused_before_the_handler_leaves_an_audit_record(
    closed_channel: grpc.Channel, tmp_path: Path
) -> None:
    """The audit stage is outside the access stage: a call the policy refuses is recorded,
    with no caller (none was identified) and the status it was answered with."""
    trail.start(AuditConfig(directory=tmp_path), "1", None, lambda _ok: None)
    try:
        with pytest.raises(grpc.RpcError) as e:
            _call(closed_channel, b"hello")
        assert e.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        trail.stop()
    rec = next(r for r in auditlog.read([tmp_path]) if r.get("kind") == "call")
    assert (rec["op"], rec["outcome"], rec["status"]) == ("Echo", "refused", "PERMISSION_DENIED")
    assert rec["identity"] == {"kind": "unauthenticated"}
