"""When the CLI may talk to hsmsignd without TLS: only on this machine, unless told so.

Plaintext gRPC carries digests, session keys and (for ``keys import``) private keys in clear,
and anyone on the path can answer in the daemon's place. Loopback addresses, ``localhost``
the unspecified address (a connection to it reaches this machine) and unix sockets never
leave the machine; every other target needs TLS or ``--insecure``. A list of addresses
(several replicas) is local only when every address in it is.
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


def _hosts(target: str) -> list[str]:
    """The host parts of a gRPC target or a ``--server`` list: ``host:port``, ``[v6]:port``,
    ``dns:///host:port``, ``dns://resolver/host:port``, ``ipv4:a.b.c.d:port[,...]``,
    ``ipv6:[v6]:port[,...]``, ``a.b.c.d:port,...`` (hsmsign.connection)."""
    if target.startswith("dns:"):
        rest = target[len("dns:") :]
        # dns://resolver/name:port: the resolver is asked, the name is what is reached.
        target = rest[2:].partition("/")[2] if rest.startswith("//") else rest
    else:
        for scheme in ("ipv4:", "ipv6:"):
            if target.startswith(scheme):
                target = target[len(scheme) :]
                break
    return [_host(address.strip()) for address in target.split(",")]


def _host(address: str) -> str:
    if address.startswith("["):
        return address[1:].partition("]")[0]
    host, sep, port = address.rpartition(":")
    return host if sep and port.isdigit() else address


def _is_local_host(host: str) -> bool:
    host = host.lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a host name: it may resolve anywhere
        return False
    # Connecting to the unspecified address (0.0.0.0, ::) reaches this machine.
    return ip.is_loopback or ip.is_unspecified


def is_local(target: str) -> bool:
    """True for targets that cannot leave this machine: every address of a list must be."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    return all(_is_local_host(host) for host in _hosts(target))


def check_plaintext(target: str, insecure: bool) -> None:
    """Raises UsageError for plaintext to a target off this machine without ``insecure``."""
    if insecure or is_local(target):
        return
    raise UsageError(
        f"refusing plaintext to {target}, which is not this machine: use TLS (--tls-ca), or "
        "pass --insecure if the network path is trusted"
    )
