"""What a PKCS#11 outcome means for the daemon: the one classification of python-pkcs11's
exceptions.

``classify`` turns any exception into a ``ServerError`` with a clear message; the tuples name
the outcome classes that the session code handles itself (a lost session, a stale handle, a
ciphertext the token rejects, a mechanism it refuses, a scan that raced another process).
Nothing above ``server.pkcs11`` sees a python-pkcs11 type.
"""

from __future__ import annotations

from typing import Final

import pkcs11.exceptions as p11e

from server.errors import (
    Busy,
    FailedPrecondition,
    InvalidArgument,
    MechanismUnsupported,
    ServerError,
    TokenUnavailable,
)

#: The session (or the token behind it) is gone: the session is replaced.
SESSION_LOST: Final = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.UserNotLoggedIn,
)

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

#: The token refused the ciphertext itself (SoftHSM2 answers CKR_GENERAL_ERROR for every bad
#: padding, OAEP or v1.5, and for an empty or oversized input).
CIPHERTEXT_REJECTED: Final = (
    p11e.EncryptedDataInvalid,
    p11e.EncryptedDataLenRange,
    p11e.WrappedKeyInvalid,
    p11e.WrappedKeyLenRange,
    p11e.DataInvalid,
    p11e.DataLenRange,
    p11e.GeneralError,
)

#: The mechanism or its parameters are refused. Our parameters come from
#: ``server.pkcs11.mechanisms`` and are well formed, so CKR_ARGUMENTS_BAD means the token
#: rejects them: SoftHSM2 2.6.1 answers it for OAEP with SHA-256 (docs/design-facts.md, fact 3).
MECHANISM_REFUSED: Final = (p11e.MechanismInvalid, p11e.MechanismParamInvalid, p11e.ArgumentsBad)

#: The token refused a wrapped value of a key import (the wrapped AES key or the wrapped
#: PKCS#8): bad padding, the wrong key, or not a key of the type asked for.
WRAPPED_KEY_REFUSED: Final = (
    *CIPHERTEXT_REJECTED,
    p11e.FunctionFailed,
    p11e.KeySizeRange,
    p11e.AttributeValueInvalid,
)

#: An attribute the object does not have, or will not reveal.
ATTRIBUTE_UNREADABLE: Final = (p11e.AttributeTypeInvalid, p11e.AttributeSensitive)


class HalfWritten(Exception):
    """A key object whose public numbers read as empty: its file is still being written."""


#: What a read-only scan of a SoftHSM2 file token raises while another process creates or
#: destroys objects in it: a vanished handle, CKR_FUNCTION_FAILED or CKR_GENERAL_ERROR while an
#: object file is half written or already unlinked, or a key whose modulus reads as empty.
SCAN_COLLIDED: Final = (*HANDLE_STALE, p11e.FunctionFailed, p11e.GeneralError, HalfWritten)

#: Any error python-pkcs11 raises for a PKCS#11 return value.
PKCS11Error: Final = p11e.PKCS11Error


#: CKR_KEY_FUNCTION_NOT_PERMITTED, which python-pkcs11 0.10.1 does not map to a class: it
#: raises a bare PKCS11Error "Unmapped error code 0x68".
_KEY_FUNCTION_NOT_PERMITTED: Final = "0x68"


def key_function_not_permitted(exc: BaseException) -> bool:
    """Whether the token refused the key for this operation (CKA_SIGN or CKA_DECRYPT false)."""
    return type(exc) is p11e.PKCS11Error and str(exc).endswith(_KEY_FUNCTION_NOT_PERMITTED)


def classify(exc: BaseException, what: str) -> ServerError:
    """Maps a python-pkcs11 exception to a daemon error with a clear message."""
    name = type(exc).__name__
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
    if isinstance(exc, p11e.PKCS11Error):
        return TokenUnavailable(f"token error during {what} ({name})")
    return TokenUnavailable(f"unexpected error during {what} ({name})")
