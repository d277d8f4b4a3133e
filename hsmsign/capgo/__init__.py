"""Capgo (capacitor-updater) encrypted live updates, with the private key in the HSM.

Modules, by concern: :mod:`~hsmsign.capgo.format` (the wire format; pure, shared with the
daemon), :mod:`~hsmsign.capgo.bundle` (seal and verify one bundle),
:mod:`~hsmsign.capgo.delta` (per-file encryption and the manifest),
:mod:`~hsmsign.capgo.project` (the bundle zip, capacitor.config), :mod:`~hsmsign.capgo.legacy`
(Capgo v1 bundles) and :mod:`~hsmsign.capgo.daemon` (the sealer that calls hsmsignd).

``from hsmsign import capgo; capgo.seal_bundle(...)`` works for every public name below; a
submodule is imported only when one of its names is first used, so importing
``hsmsign.capgo.format`` (as the daemon does) loads no file handling.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

#: Public name -> the submodule that defines it.
_EXPORTS: Final = {
    **dict.fromkeys(
        (
            "CAPGO_RSA_BITS",
            "BundleFormatError",
            "BundleVerificationError",
            "CapgoError",
            "ChecksumFormat",
            "checksum_format_for_plugin",
            "checksum_signing_input",
            "decode_signed_checksum",
            "encode_signed_checksum",
            "format_iv_session_key",
            "key_id",
            "load_capgo_public_key",
            "parse_iv_session_key",
            "plugin_supports_delta",
            "require_rsa_2048",
            "rsa_public_decrypt",
        ),
        "format",
    ),
    **dict.fromkeys(
        (
            "BundleSeal",
            "OneCallSealer",
            "PublicKeyAware",
            "SealedBundle",
            "Sealer",
            "SessionMaterial",
            "VerifyResult",
            "check_bundle_zip",
            "encrypt_bundle",
            "new_session_material",
            "open_session",
            "seal_bundle",
            "verify_bundle",
        ),
        "bundle",
    ),
    **dict.fromkeys(
        ("DeltaEntry", "DeltaResult", "delta_files", "encrypt_delta", "verify_delta_file"),
        "delta",
    ),
    **dict.fromkeys(
        ("CapacitorConfigError", "default_zip_path", "make_bundle_zip", "set_capacitor_public_key"),
        "project",
    ),
    "decrypt_v1_bundle": "legacy",
    "DaemonSealer": "daemon",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # explicit re-exports for type checkers (``X as X``)
    from hsmsign.capgo.bundle import (
        BundleSeal as BundleSeal,
    )
    from hsmsign.capgo.bundle import (
        OneCallSealer as OneCallSealer,
    )
    from hsmsign.capgo.bundle import (
        PublicKeyAware as PublicKeyAware,
    )
    from hsmsign.capgo.bundle import (
        SealedBundle as SealedBundle,
    )
    from hsmsign.capgo.bundle import (
        Sealer as Sealer,
    )
    from hsmsign.capgo.bundle import (
        SessionMaterial as SessionMaterial,
    )
    from hsmsign.capgo.bundle import (
        VerifyResult as VerifyResult,
    )
    from hsmsign.capgo.bundle import (
        check_bundle_zip as check_bundle_zip,
    )
    from hsmsign.capgo.bundle import (
        encrypt_bundle as encrypt_bundle,
    )
    from hsmsign.capgo.bundle import (
        new_session_material as new_session_material,
    )
    from hsmsign.capgo.bundle import (
        open_session as open_session,
    )
    from hsmsign.capgo.bundle import (
        seal_bundle as seal_bundle,
    )
    from hsmsign.capgo.bundle import (
        verify_bundle as verify_bundle,
    )
    from hsmsign.capgo.daemon import (
        DaemonSealer as DaemonSealer,
    )
    from hsmsign.capgo.delta import (
        DeltaEntry as DeltaEntry,
    )
    from hsmsign.capgo.delta import (
        DeltaResult as DeltaResult,
    )
    from hsmsign.capgo.delta import (
        delta_files as delta_files,
    )
    from hsmsign.capgo.delta import (
        encrypt_delta as encrypt_delta,
    )
    from hsmsign.capgo.delta import (
        verify_delta_file as verify_delta_file,
    )
    from hsmsign.capgo.format import (
        CAPGO_RSA_BITS as CAPGO_RSA_BITS,
    )
    from hsmsign.capgo.format import (
        BundleFormatError as BundleFormatError,
    )
    from hsmsign.capgo.format import (
        BundleVerificationError as BundleVerificationError,
    )
    from hsmsign.capgo.format import (
        CapgoError as CapgoError,
    )
    from hsmsign.capgo.format import (
        ChecksumFormat as ChecksumFormat,
    )
    from hsmsign.capgo.format import (
        checksum_format_for_plugin as checksum_format_for_plugin,
    )
    from hsmsign.capgo.format import (
        checksum_signing_input as checksum_signing_input,
    )
    from hsmsign.capgo.format import (
        decode_signed_checksum as decode_signed_checksum,
    )
    from hsmsign.capgo.format import (
        encode_signed_checksum as encode_signed_checksum,
    )
    from hsmsign.capgo.format import (
        format_iv_session_key as format_iv_session_key,
    )
    from hsmsign.capgo.format import (
        key_id as key_id,
    )
    from hsmsign.capgo.format import (
        load_capgo_public_key as load_capgo_public_key,
    )
    from hsmsign.capgo.format import (
        parse_iv_session_key as parse_iv_session_key,
    )
    from hsmsign.capgo.format import (
        plugin_supports_delta as plugin_supports_delta,
    )
    from hsmsign.capgo.format import (
        require_rsa_2048 as require_rsa_2048,
    )
    from hsmsign.capgo.format import (
        rsa_public_decrypt as rsa_public_decrypt,
    )
    from hsmsign.capgo.legacy import (
        decrypt_v1_bundle as decrypt_v1_bundle,
    )
    from hsmsign.capgo.project import (
        CapacitorConfigError as CapacitorConfigError,
    )
    from hsmsign.capgo.project import (
        default_zip_path as default_zip_path,
    )
    from hsmsign.capgo.project import (
        make_bundle_zip as make_bundle_zip,
    )
    from hsmsign.capgo.project import (
        set_capacitor_public_key as set_capacitor_public_key,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hsmsign.capgo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hsmsign.capgo.{module}"), name)
    globals()[name] = value
    return value
