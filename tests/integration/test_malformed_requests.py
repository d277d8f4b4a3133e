"""Random and malformed messages at every RPC of Signer and KeyAdmin on a real daemon: each
gets an expected status (never INTERNAL, UNKNOWN or UNAVAILABLE) and the daemon serves on.

Property-based generation (hypothesis): field values are drawn from each request's message
descriptor, biased towards the names, versions and lengths the daemon checks, so the
generator reaches the handlers' deeper branches; and raw random bytes go out as the request
body through a generic channel with identity serializers, for what no valid message is.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsmsign.v1 import hsmsign_pb2 as pb
from hsmsign.v1 import hsmsign_pb2_grpc as pb_grpc
from tests.conftest import Daemon, TokenDir, hsmsignd, make_token, start_daemon, write_config

#: What bad input may get. INTERNAL and UNKNOWN mean the daemon failed on it; UNAVAILABLE
#: would blame the token; DEADLINE_EXCEEDED would be a hang.
EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
}

SERVICES = [pb.DESCRIPTOR.services_by_name[n] for n in ("Signer", "KeyAdmin")]
METHODS = [m for s in SERVICES for m in s.methods]
STUBS = {"Signer": pb_grpc.SignerStub, "KeyAdmin": pb_grpc.KeyAdminStub}

#: Names and versions that exist in this module's token, and the lengths the daemon checks
#: (session keys, IVs, digests, checksums, RSA-2048/3072 blocks).
KEY_NAMES = ["sig", "unw", "nope", ""]
LENGTHS = [0, 1, 15, 16, 17, 20, 28, 31, 32, 33, 48, 64, 255, 256, 257, 384]

SETTINGS = settings(
    max_examples=40,
    deadline=None,  # a call's time is bounded by its gRPC deadline instead
    database=None,  # no example database written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Target:
    daemon: Daemon
    channel: grpc.Channel


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """A daemon on a token of its own: random KeyAdmin calls change keys."""
    token: TokenDir = make_token(tmp_path_factory.mktemp("fuzz-token"))
    cfg = write_config(token.path / "c.toml", token, extra="[server]\nprocesses = 1\n")
    hsmsignd(cfg, "keys", "create", "sig")
    hsmsignd(cfg, "keys", "rotate", "sig")
    hsmsignd(cfg, "keys", "create", "unw", "--purpose", "unwrap")
    d = start_daemon(cfg, tmp_path_factory.mktemp("fuzz-daemon"))
    channel = grpc.insecure_channel(d.address)
    try:
        yield Target(d, channel)
    finally:
        channel.close()
        d.stop()
    assert "internal error" not in d.log(), d.log()


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return st.one_of(
            st.sampled_from(KEY_NAMES),
            st.text(max_size=80),
            st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map(
                lambda h: "sha256:" + h
            ),
            st.just("x" * 5000),
        )
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.sampled_from(LENGTHS).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
            st.binary(max_size=600),
        )
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        lo, hi = _INT_RANGES[FieldDescriptor.TYPE_INT32]
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(lo, hi))
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    lo, hi = _INT_RANGES[t]
    return st.one_of(st.integers(max(lo, -3), min(hi, 4)), st.integers(lo, hi))


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    one = (
        messages(field.message_type, depth + 1)
        if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type is not None
        else _scalar(field)
    )
    if field.is_repeated:
        return st.lists(one, max_size=6)
    return one


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of fields set to drawn values."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for field in descriptor.fields:
            if not draw(st.booleans()):
                continue
            value = draw(_field(field, depth))
            if field.is_repeated:
                target = getattr(msg, field.name)
                if field.type == FieldDescriptor.TYPE_MESSAGE:
                    for v in value:
                        target.add().CopyFrom(v)
                else:
                    target.extend(value)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, field.name).CopyFrom(value)
            else:
                setattr(msg, field.name, value)
        return msg

    return build()


def _status(call: Any, request: Any) -> grpc.StatusCode:
    try:
        call(request, timeout=30)
    except grpc.RpcError as e:
        code: grpc.StatusCode = e.code()
        assert code in EXPECTED, f"{code.name}: {e.details()}"
        return code
    return grpc.StatusCode.OK


def _still_serving(t: Target) -> None:
    stub = pb_grpc.SignerStub(t.channel)
    reply = stub.GetPublicKey(pb.GetPublicKeyRequest(key=pb.KeyRef(name="sig")), timeout=30)
    assert reply.key.name == "sig"


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_random_messages_get_expected_statuses(target: Target, method: MethodDescriptor) -> None:
    call = getattr(STUBS[method.containing_service.name](target.channel), method.name)

    @SETTINGS
    @given(request=messages(method.input_type))
    def check(request: Message) -> None:
        _status(call, request)

    check()
    _still_serving(target)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_random_bytes_get_expected_statuses(target: Target, method: MethodDescriptor) -> None:
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = target.channel.unary_unary(
        _path(method), request_serializer=None, response_deserializer=None
    )

    @settings(SETTINGS, max_examples=30)
    @given(body=st.binary(max_size=400))
    def check(body: bytes) -> None:
        _status(call, body)

    check()
    _still_serving(target)


def test_truncated_and_mangled_valid_messages(target: Target) -> None:
    """A valid request cut short or with a byte flipped: the deserializer's failure is the
    caller's fault (INVALID_ARGUMENT), not the daemon's."""
    body = pb.SignDigestRequest(
        key=pb.KeyRef(name="sig"),
        algorithm=pb.SIGNATURE_ALGORITHM_RSA_PKCS1_V15_SHA256,
        digest=bytes(32),
    ).SerializeToString()
    call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = target.channel.unary_unary(
        _path(pb.DESCRIPTOR.services_by_name["Signer"].methods_by_name["SignDigest"])
    )
    codes = {_status(call, body[:n]) for n in range(1, len(body))}
    codes |= {
        _status(call, body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]) for i in range(len(body))
    }
    assert grpc.StatusCode.INVALID_ARGUMENT in codes
    _still_serving(target)


def test_log_has_no_traceback_yet(target: Target) -> None:
    log = target.daemon.log()
    assert "Traceback" not in log and "internal error" not in log, log
