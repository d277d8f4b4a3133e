"""Restarts are immediate: TIME_WAIT sockets left on the port by a stopped daemon do not
block the next start, while a port another program listens on is still refused."""

from __future__ import annotations

import socket
from pathlib import Path

from hsmsign.client import Client
from tests.harness import hsmsignd, start_daemon

# TCP state TIME_WAIT in /proc/net/tcp.
_TIME_WAIT = "06"


def _time_wait_on_port(port: int) -> int:
    """TIME_WAIT sockets whose local port is ``port`` (IPv4 loopback)."""
    count = 0
    # gRPC listens on a dual-stack IPv6 socket: IPv4 peers appear in tcp6 as ::ffff:a.b.c.d.
    lines = [
        line
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for line in Path(table).read_text().splitlines()[1:]
    ]
    for line in lines:
        fields = line.split()
        local, state = fields[1], fields[3]
        if state == _TIME_WAIT and int(local.rpartition(":")[2], 16) == port:
            count += 1
    return count


def test_restart_on_same_port_despite_time_wait(config: Path, tmp_path: Path) -> None:
    first = start_daemon(config, tmp_path / "first")
    port = int(first.address.rpartition(":")[2])
    with Client(first.address) as c:
        assert c.public_key("demo").key.name == "demo"
    # Connections the daemon closes first leave their TIME_WAIT on its port. Each is read to
    # its end before closing (unread bytes would make the close a reset, not a FIN).
    held = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(8)]
    try:
        assert first.stop() == 0
        for s in held:
            while s.recv(65536):
                pass
    finally:
        for s in held:
            s.close()
    assert _time_wait_on_port(port) > 0, "the test needs TIME_WAIT sockets on the port"

    second = start_daemon(config, tmp_path / "second", "--listen", f"127.0.0.1:{port}")
    try:
        assert second.address == f"127.0.0.1:{port}"
        with Client(second.address) as c:
            assert c.public_key("demo").key.name == "demo"
    finally:
        assert second.stop() == 0


def test_port_with_a_listener_is_refused(config: Path) -> None:
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        for processes in ("1", "2"):
            cfg = config.parent / f"listener-{processes}.toml"
            cfg.write_text(
                config.read_text().replace(
                    "[token]", f"[server]\nprocesses = {processes}\n[token]", 1
                )
            )
            r = hsmsignd(cfg, "serve", "--listen", f"127.0.0.1:{port}", check=False, timeout=60)
            assert r.returncode == 1
            errors = [line for line in r.stderr.splitlines() if "hsmsignd: error:" in line]
            expected = (
                f"hsmsignd: error: cannot listen on 127.0.0.1:{port} "
                "(in use, or not a local address?); choose another with --listen HOST:PORT or "
                "server.listen"
            )
            assert errors == [expected], r.stderr
            assert "Traceback" not in r.stderr
