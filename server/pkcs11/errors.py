"""What a PKCS#11 outcome means for the daemon: the one classification of python-pkcs11's
exceptions.

``OUTCOMES`` puts every python-pkcs11 exception class in one outcome class, which says who
handles it and how (``server.pkcs11.token``): a refusal of this request, a lost session, a
lost login, a failed device or module, or a refused PIN. ``classify`` turns any exception
into a ``ServerError`` with a clear message; the tuples below name the refusals that the
session code handles itself (a stale handle, a ciphertext the token rejects, a mechanism it
refuses, a scan that raced another process). Nothing above ``server.pkcs11`` sees a
python-pkcs11 type.
"""

from __future__ import annotations

from enum import Enum
from typing import Final

import pkcs11.exceptions as p11e

from server.errors import (
    Busy,
    FailedPrecondition,
    InvalidArgument,
    MechanismUnsupported,
    PinRefused,
    ServerError,
    TokenUnavailable,
)


class Outcome(Enum):
    """What a PKCS#11 error means, and what the daemon does about it."""

    #: The token refused this request (its input, key, mechanism or template): answered as
    #: the classified error; never retried.
    REQUEST = "request"
    #: The session (or a handle in it) is gone: the session is reopened and key handles are
    #: looked up again; a call without side effects is retried once on the fresh session.
    SESSION = "session"
    #: The login is gone (a logout after maintenance): log in again once, on the login session.
    LOGIN = "login"
    #: The device or the module failed: finalize and re-initialise the module, find the token
    #: again by its configured label or serial, log in, rebuild the pool, with backoff.
    DEVICE = "device"
    #: The token refused the PIN (incorrect, locked, expired): never tried again by anything;
    #: the serving process stops (exit 77, ``server.errors.PinRefused``).
    PIN = "pin"


R, S, L, D, P = Outcome.REQUEST, Outcome.SESSION, Outcome.LOGIN, Outcome.DEVICE, Outcome.PIN

#: Every python-pkcs11 exception class and its outcome (tests/unit/test_pkcs11_errors.py checks
#: that none is missing). A class not listed (a newer python-pkcs11) counts as DEVICE, as does
#: a bare PKCS11Error: python-pkcs11 raises that for CKR_CRYPTOKI_NOT_INITIALIZED and for
#: return values it does not know.
OUTCOMES: Final[dict[type[p11e.PKCS11Error], Outcome]] = {
    p11e.PKCS11Error: D,
    p11e.AnotherUserAlreadyLoggedIn: L,
    p11e.ArgumentsBad: R,
    p11e.AttributeReadOnly: R,
    p11e.AttributeSensitive: R,
    p11e.AttributeTypeInvalid: R,
    p11e.AttributeValueInvalid: R,
    p11e.DataInvalid: R,
    p11e.DataLenRange: R,
    p11e.DeviceError: D,
    p11e.DeviceMemory: R,
    p11e.DeviceRemoved: D,
    p11e.DomainParamsInvalid: R,
    p11e.EncryptedDataInvalid: R,
    p11e.EncryptedDataLenRange: R,
    p11e.ExceededMaxIterations: R,
    p11e.FunctionCancelled: S,
    # CKR_FUNCTION_FAILED: "could not be performed"; SoftHSM2 answers it for a read that
    # raced a write. Reopen and retry once; a repeat on the fresh session is a DEVICE fault.
    p11e.FunctionFailed: S,
    p11e.FunctionNotSupported: R,
    p11e.FunctionRejected: R,
    # CKR_GENERAL_ERROR is a device fault, except where the token uses it for a rejected
    # ciphertext (SoftHSM2 during unwrap): server.pkcs11.session tells those apart.
    p11e.GeneralError: D,
    p11e.HostMemory: R,
    p11e.KeyHandleInvalid: S,
    p11e.KeyIndigestible: R,
    p11e.KeyNeeded: R,
    p11e.KeyNotNeeded: R,
    p11e.KeyNotWrappable: R,
    p11e.KeySizeRange: R,
    p11e.KeyTypeInconsistent: R,
    p11e.KeyUnextractable: R,
    p11e.MechanismInvalid: R,
    p11e.MechanismParamInvalid: R,
    p11e.MultipleObjectsReturned: R,
    p11e.MultipleTokensReturned: D,
    p11e.NoEvent: R,
    p11e.NoSuchKey: R,
    p11e.NoSuchToken: D,
    p11e.ObjectHandleInvalid: S,
    p11e.OperationActive: S,
    p11e.OperationNotInitialized: S,
    p11e.PinExpired: P,
    p11e.PinIncorrect: P,
    p11e.PinInvalid: P,
    p11e.PinLenRange: P,
    p11e.PinLocked: P,
    p11e.PinTooWeak: R,
    p11e.PublicKeyInvalid: R,
    p11e.RandomNoRNG: R,
    p11e.RandomSeedNotSupported: R,
    p11e.SessionClosed: S,
    p11e.SessionCount: R,
    p11e.SessionExists: S,
    p11e.SessionHandleInvalid: S,
    p11e.SessionReadOnly: S,
    p11e.SessionReadOnlyExists: S,
    p11e.SessionReadWriteSOExists: L,
    p11e.SignatureInvalid: R,
    p11e.SignatureLenRange: R,
    p11e.SlotIDInvalid: D,
    p11e.TemplateIncomplete: R,
    p11e.TemplateInconsistent: R,
    p11e.TokenNotPresent: D,
    p11e.TokenNotRecognised: D,
    p11e.TokenWriteProtected: R,
    p11e.UnwrappingKeyHandleInvalid: S,
    p11e.UnwrappingKeySizeRange: R,
    p11e.UnwrappingKeyTypeInconsistent: R,
    p11e.UserAlreadyLoggedIn: L,
    p11e.UserNotLoggedIn: L,
    # A token half way through initialisation (user PIN not set yet): no PIN to lock, and
    # retried like a missing token, never taken for a refused PIN.
    p11e.UserPinNotInitialized: D,
    p11e.UserTooManyTypes: L,
    p11e.WrappedKeyInvalid: R,
    p11e.WrappedKeyLenRange: R,
    p11e.WrappingKeyHandleInvalid: S,
    p11e.WrappingKeySizeRange: R,
    p11e.WrappingKeyTypeInconsistent: R,
}
del R, S, L, D, P


def outcome(exc: BaseException) -> Outcome:
    """The outcome class of an exception raised by python-pkcs11 (anything else: DEVICE)."""
    if key_function_not_permitted(exc):
        # A bare PKCS11Error like the device faults, but the token refusing a disabled key
        # (docs/adr/0007): a refusal of this request, never a reason to re-initialise.
        return Outcome.REQUEST
    for cls in type(exc).__mro__:
        found = OUTCOMES.get(cls)
        if found is not None:
            return found
    return Outcome.DEVICE


class TokenFault(TokenUnavailable):
    """A SESSION, LOGIN or DEVICE fault during a call: UNAVAILABLE (retryable). ``outcome``
    tells ``Token.run`` whether a retry on a fresh session may help."""

    def __init__(self, message: str, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


#: A cached object handle is stale (destroyed or re-created elsewhere).
HANDLE_STALE: Final = (p11e.KeyHandleInvalid, p11e.ObjectHandleInvalid)

#: C_UnwrapKey is not offered for this mechanism, key or template: fall back to C_Decrypt.
UNWRAP_NOT_OFFERED: Final = (
    p11e.FunctionNotSupported,
    p11e.FunctionRejected,
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.ArgumentsBad,
    p11e.KeyTypeInconsistent,
    p11e.TemplateInconsistent,
    p11e.TemplateIncomplete,
    p11e.AttributeValueInvalid,
)

#: The token refused the ciphertext itself.
CIPHERTEXT_REJECTED: Final = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
)

#: What SoftHSM2 answers for every bad padding, OAEP or v1.5, and for an empty or oversized
#: input, and also what a failing device answers: a rejection only if the token is healthy
#: right after it (``Session.rejected_or_fault``).
AMBIGUOUS_REJECTION: Final = (p11e.GeneralError,)

#: The mechanism or its parameters are refused. Our parameters come from
#: ``server.pkcs11.mechanisms`` and are well formed, so CKR_ARGUMENTS_BAD means the token
#: rejects them: SoftHSM2 2.6.1 answers it for OAEP with SHA-256 (docs/design-facts.md, fact 3).
MECHANISM_REFUSED: Final = (p11e.MechanismInvalid, p11e.MechanismParamInvalid, p11e.ArgumentsBad)

#: The token refused a wrapped value of a key import (the wrapped AES key or the wrapped
#: PKCS#8): bad padding, the wrong key, or not a key of the type asked for.
WRAPPED_KEY_REFUSED: Final = (
    *CIPHERTEXT_REJECTED,
    *AMBIGUOUS_REJECTION,
    p11e.FunctionFailed,
    p11e.KeySizeRange,
    p11e.AttributeValueInvalid,
)

#: An attribute the object does not have, or will not reveal.
ATTRIBUTE_UNREADABLE: Final = (p11e.AttributeTypeInvalid, p11e.AttributeSensitive)

#: The token refused the PIN at login.
PIN_REFUSED: Final = tuple(c for c, o in OUTCOMES.items() if o is Outcome.PIN)


class HalfWritten(Exception):
    """A key object whose public numbers read as empty: its file is still being written."""


#: What a read-only scan of a SoftHSM2 file token raises while another process creates or
#: destroys objects in it: a vanished handle, CKR_FUNCTION_FAILED or CKR_GENERAL_ERROR while an
#: object file is half written or already unlinked, or a key whose modulus reads as empty.
SCAN_COLLIDED: Final = (*HANDLE_STALE, p11e.FunctionFailed, p11e.GeneralError, HalfWritten)

#: Any error python-pkcs11 raises for a PKCS#11 return value.
PKCS11Error: Final = p11e.PKCS11Error


def pin_refused(exc: BaseException, where: str) -> PinRefused:
    """The one message for a PIN the token refused (never the PIN itself)."""
    if isinstance(exc, p11e.PinLocked):
        return PinRefused("the token's user PIN is locked; unlock it with the SO PIN")
    if isinstance(exc, p11e.PinExpired):
        return PinRefused("the token's user PIN has expired; set a new one with the token's tools")
    return PinRefused(
        f"the token refused the PIN from {where} (not retried, to avoid locking the token)"
    )


#: CKR_KEY_FUNCTION_NOT_PERMITTED, which python-pkcs11 0.10.1 does not map to a class: it
#: raises a bare PKCS11Error "Unmapped error code 0x68".
_KEY_FUNCTION_NOT_PERMITTED: Final = "0x68"


def key_function_not_permitted(exc: BaseException) -> bool:
    """Whether the token refused the key for this operation (CKA_SIGN or CKA_DECRYPT false)."""
    return type(exc) is p11e.PKCS11Error and str(exc).endswith(_KEY_FUNCTION_NOT_PERMITTED)


def classify(exc: BaseException, what: str) -> ServerError:
    """Maps a python-pkcs11 exception to a daemon error with a clear message: a REQUEST
    refusal to the status that says why, a PIN refusal to PinRefused, and every SESSION,
    LOGIN or DEVICE fault to TokenFault (UNAVAILABLE, retryable)."""
    name = type(exc).__name__
    kind = outcome(exc)
    if kind is Outcome.PIN:
        return pin_refused(exc, "the PIN source")
    if kind is not Outcome.REQUEST:
        return TokenFault(f"token error during {what} ({name}); retry", kind)
    if isinstance(exc, p11e.MechanismInvalid | p11e.MechanismParamInvalid):
        return MechanismUnsupported(f"the token does not support {what} ({name})")
    if isinstance(exc, p11e.FunctionNotSupported):
        return MechanismUnsupported(f"the token does not implement {what} ({name})")
    if isinstance(exc, p11e.DataLenRange | p11e.DataInvalid):
        return InvalidArgument(f"the token refused the input for {what} ({name})")
    if key_function_not_permitted(exc):
        # The key's CKA_SIGN/CKA_DECRYPT is false: hsmsign sets it so for a disabled version.
        return FailedPrecondition(f"the token refuses this key version for {what}: disabled")
    if isinstance(exc, p11e.KeyTypeInconsistent | p11e.KeyIndigestible | p11e.FunctionRejected):
        return FailedPrecondition(f"the key cannot be used for {what} ({name})")
    if isinstance(exc, p11e.AttributeReadOnly):
        return FailedPrecondition(f"the token does not allow changing this attribute ({what})")
    if isinstance(exc, p11e.DeviceMemory | p11e.HostMemory | p11e.SessionCount):
        return Busy(f"the token is out of resources during {what} ({name}); retry later")
    return FailedPrecondition(f"the token refused {what} ({name})")
