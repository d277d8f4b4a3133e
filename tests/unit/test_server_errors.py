"""The daemon's one error root: a status per call error, an exit code per start-up error, each
applied in exactly one place."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from hsmsign.errors import Error as ClientError
from server import errors, main
from server.api import pipeline

SERVER = Path(__file__).resolve().parents[2] / "server"

#: One class per status a call can end with (refinements below them keep the status).
STATUS_CLASSES = {
    grpc.StatusCode.INTERNAL: errors.ServerError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.KeyNotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.Busy,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
}


def test_the_daemon_has_its_own_root() -> None:
    assert not issubclass(errors.ServerError, ClientError)
    assert not hasattr(errors.ServerError, "status_name")


@pytest.mark.parametrize(("code", "cls"), STATUS_CLASSES.items())
def test_one_class_per_status(code: grpc.StatusCode, cls: type[errors.ServerError]) -> None:
    assert cls.code is code
    assert issubclass(cls, errors.ServerError)


@pytest.mark.parametrize(
    ("cls", "parent"),
    [
        (errors.KeyObjectGone, errors.KeyNotFound),
        (errors.MechanismUnsupported, errors.FailedPrecondition),
        (errors.TokenUnavailable, errors.Unavailable),
    ],
)
def test_refinements_keep_their_status(
    cls: type[errors.ServerError], parent: type[errors.ServerError]
) -> None:
    assert issubclass(cls, parent) and cls.code is parent.code


@pytest.mark.parametrize(
    ("cls", "exit_code"),
    [(errors.StartupError, 1), (errors.TokenNotFound, 1), (errors.ConfigError, 2)],
)
def test_start_up_errors_carry_their_exit_code(
    cls: type[errors.ServerError], exit_code: int
) -> None:
    assert issubclass(cls, errors.StartupError) and cls.exit_code == exit_code


def _files_matching(pattern: str) -> set[str]:
    rx = re.compile(pattern)
    return {
        str(p.relative_to(SERVER))
        for p in SERVER.rglob("*.py")
        if any(rx.search(line) for line in p.read_text().splitlines())
    }


def test_errors_become_status_codes_in_one_place() -> None:
    # dispatch.py only carries the pipeline's abort from its serving thread to the event loop.
    assert _files_matching(r"\.abort\(") == {"api/pipeline.py", "api/dispatch.py"}
    assert _files_matching(r"^\s+code = grpc\.StatusCode") == {"errors.py"}
    assert [name for name, _stage in pipeline.STAGES][:2] == ["access_log", "status"]


def test_errors_become_exit_codes_in_one_place() -> None:
    assert _files_matching(r"\.exit_code\b") == {"main.py"}


def test_a_bad_config_path_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main.main(["--config", str(tmp_path / "missing.toml"), "keys", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsmsignd: config error: cannot read config") and err.count("\n") == 1
