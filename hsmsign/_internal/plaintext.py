"""When the CLI may talk to hsmsignd without TLS: only on this machine, unless told so.

Plaintext gRPC carries digests, session keys and (for ``keys import``) private keys in clear,
and anyone on the path can answer in the daemon's place. Loopback addresses, ``localhost``
the unspecified address (a connection to it reaches this machine) and unix sockets never
leave the machine; every other target needs TLS or ``--insecure``.
"""

from __future__ import annotations

import ipaddress

from hsmsign.errors import UsageError

#: Printed (stderr) before a private key is sent over a connection without TLS.
IMPORT_WARNING = (
    "hsmsign: warning: sending the private key over a plaintext connection (no TLS); anyone "
    "who can read this connection can read the key"
)
#: Printed (stderr) before a wrapped import over a connection without TLS: the key is not in
#: clear, but nothing proves the import wrapping key is the daemon's.
WRAPPED_IMPORT_WARNING = (
    "hsmsign: warning: importing a private key over a plaintext connection (no TLS): it is "
    "wrapped, but nothing authenticates the import wrapping key; compare its fingerprint "
    "below with the one in the daemon's log"
)


def _host(target: str) -> str:
    """The host part of a gRPC target: ``host:port``, ``[v6]:port``, ``dns:///host:port``,
    ``ipv4:a.b.c.d:port``, ``ipv6:[v6]:port``."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        return target[1:].partition("]")[0]
    host, sep, port = target.rpartition(":")
    return host if sep and port.isdigit() else target


def is_local(target: str) -> bool:
    """True for targets that cannot leave this machine."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = _host(target).lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a host name: it may resolve anywhere
        return False
    # Connecting to the unspecified address (0.0.0.0, ::) reaches this machine.
    return ip.is_loopback or ip.is_unspecified


def check_plaintext(target: str, insecure: bool) -> None:
    """Raises UsageError for plaintext to a target off this machine without ``insecure``."""
    if insecure or is_local(target):
        return
    raise UsageError(
        f"refusing plaintext to {target}, which is not this machine: use TLS (--tls-ca), or "
        "pass --insecure if the network path is trusted"
    )
