"""The development identity: callers on this host, over loopback TCP or a unix socket.

gRPC tells a servicer little about a unix-socket peer (``context.peer()`` is ``unix:...``
with no credentials), so the peer uid is not used: any local user is ``local``.
"""

from __future__ import annotations

import ipaddress

from server.identity.model import Identity

LOCAL = "local"
#: Every caller on the admin socket (``server.admin_listen``): who may connect is the socket
#: file's owner, group and mode; gRPC does not tell the peer's uid.
ADMIN_SOCKET = "admin-socket"


def is_local_peer(peer: str) -> bool:
    """True for a gRPC peer string of a loopback address or a unix socket."""
    if peer.startswith("unix:") or peer.startswith("unix-abstract:"):
        return True
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        host = rest.rpartition(":")[0]
    elif kind == "ipv6":
        host = rest.rpartition(":")[0].strip("[]")
    else:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_local_address(listen: str) -> bool:
    """True for a listen address only this host can reach: loopback or a unix socket."""
    if listen.startswith("unix:") or listen.startswith("unix-abstract:"):
        return True
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_identity(peer: str) -> Identity:
    """The one identity of every caller on this host (the peer's port is not part of it:
    limits are shared by all local callers)."""
    subject = "unix socket" if peer.startswith("unix") else "loopback"
    return Identity(kind="local", name=LOCAL, subject=subject)


def admin_socket_identity(listen: str) -> Identity:
    """The identity of a caller on the admin socket ``listen``."""
    return Identity(kind="socket", name=ADMIN_SOCKET, subject=listen)
