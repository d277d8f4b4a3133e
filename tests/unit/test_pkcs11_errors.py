"""The one classification of PKCS#11 outcomes: every python-pkcs11 exception class is in the
table, and each outcome class becomes the status the operations guide documents."""

from __future__ import annotations

import inspect

import grpc
import pkcs11.exceptions as p11e
import pytest

from server.errors import PinRefused
from server.pkcs11.errors import OUTCOMES, Outcome, TokenFault, classify, outcome


def _every_exception_class() -> list[type[p11e.PKCS11Error]]:
    return [
        c for c in vars(p11e).values() if inspect.isclass(c) and issubclass(c, p11e.PKCS11Error)
    ]


def test_every_python_pkcs11_exception_class_is_in_the_table() -> None:
    missing = sorted(c.__name__ for c in _every_exception_class() if c not in OUTCOMES)
    assert missing == []


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (p11e.DeviceError, Outcome.DEVICE),
        (p11e.DeviceRemoved, Outcome.DEVICE),
        (p11e.TokenNotPresent, Outcome.DEVICE),
        (p11e.GeneralError, Outcome.DEVICE),
        (p11e.SessionHandleInvalid, Outcome.SESSION),
        (p11e.SessionClosed, Outcome.SESSION),
        (p11e.UserNotLoggedIn, Outcome.LOGIN),
        (p11e.PinIncorrect, Outcome.PIN),
        (p11e.PinLocked, Outcome.PIN),
        (p11e.PinExpired, Outcome.PIN),
        # a token being initialised has no user PIN yet: retried, never a refused PIN
        (p11e.UserPinNotInitialized, Outcome.DEVICE),
        (p11e.MechanismInvalid, Outcome.REQUEST),
        (p11e.DataLenRange, Outcome.REQUEST),
    ],
)
def test_outcome_classes(exc: type[p11e.PKCS11Error], expected: Outcome) -> None:
    assert outcome(exc()) is expected


def test_a_bare_pkcs11_error_is_a_device_fault() -> None:
    # python-pkcs11 raises it for CKR_CRYPTOKI_NOT_INITIALIZED and unknown return values.
    assert outcome(p11e.PKCS11Error("Initialisation error (not initialized)")) is Outcome.DEVICE


@pytest.mark.parametrize("exc", _every_exception_class(), ids=lambda c: c.__name__)
def test_classify_gives_the_outcome_class_its_status(exc: type[p11e.PKCS11Error]) -> None:
    err = classify(exc(), "signing")
    kind = OUTCOMES[exc]
    if kind is Outcome.PIN:
        assert isinstance(err, PinRefused) and err.exit_code == 77
    elif kind is Outcome.REQUEST:
        assert err.code is not grpc.StatusCode.UNAVAILABLE  # a refusal is not retryable
    else:
        assert isinstance(err, TokenFault) and err.code is grpc.StatusCode.UNAVAILABLE
        assert err.outcome is kind
    assert "\n" not in str(err)


def test_a_disabled_key_refused_by_the_token_is_a_request_refusal_not_a_device_fault() -> None:
    # python-pkcs11 0.10.1 raises CKR_KEY_FUNCTION_NOT_PERMITTED (a key whose CKA_SIGN a
    # disable turned off, docs/adr/0007) as a bare PKCS11Error, like unknown device codes:
    # counted as DEVICE it would re-initialise the module for every call to a disabled key.
    refused = p11e.PKCS11Error("Unmapped error code 0x68")
    assert outcome(refused) is Outcome.REQUEST
    assert classify(refused, "signing").code == grpc.StatusCode.FAILED_PRECONDITION
