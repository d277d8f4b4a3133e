"""A minimal raw HTTP/2 client for abuse tests: streams that open a gRPC call (headers) and
then send nothing, or a declared body only part of the way. No library: the frames and the
HPACK literals it needs are a few bytes each (RFC 9113, RFC 7541).

The client behaves like a live, patient peer: it acknowledges the server's SETTINGS and PINGs
(a reader thread), so the server cannot tell it from a slow client on a bad network.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream & 0x7FFFFFFF)
        + payload
    )


def _hpack_length(n: int) -> bytes:
    # A string length with a 7-bit prefix, no Huffman coding.
    if n < 127:
        return bytes([n])
    out, n = bytearray([127]), n - 127
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def hpack_literal(headers: list[tuple[str, str]]) -> bytes:
    """A header block of literal fields without indexing (no dynamic table state)."""
    block = bytearray()
    for name, value in headers:
        block.append(0x00)
        for text in (name.encode(), value.encode()):
            block += _hpack_length(len(text)) + text
    return bytes(block)


class RawH2Connection:
    """One TCP connection speaking HTTP/2 by hand; closes itself on exit."""

    def __init__(self, address: str, timeout: float = 10.0, answer_pings: bool = True) -> None:
        """``answer_pings=False``: the server's PINGs are never acknowledged, as from a peer
        that vanished without closing its connection."""
        host, _, port = address.rpartition(":")
        self.answer_pings = answer_pings
        #: PINGs the server sent (not acknowledgements of ours).
        self.pings = 0
        self.authority = address
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._send_lock = threading.Lock()
        self._next_stream = 1
        #: Set when the server closed the connection (EOF, reset or GOAWAY).
        self.closed = threading.Event()
        self.goaway = threading.Event()
        #: Streams the server has ended (trailers with END_STREAM, or RST_STREAM).
        self.ended: set[int] = set()
        self.changed = threading.Condition()
        self._send(PREFACE + frame(SETTINGS, 0, 0))
        self._reader = threading.Thread(target=self._read, name="h2raw", daemon=True)
        self._reader.start()

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def _read(self) -> None:
        self.sock.settimeout(None)
        try:
            while True:
                head = self._recv_exact(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                payload = self._recv_exact(length)
                if kind == SETTINGS and not flags & ACK:
                    self._send(frame(SETTINGS, ACK, 0))
                elif kind == PING and not flags & ACK:
                    self.pings += 1
                    if self.answer_pings:
                        self._send(frame(PING, ACK, 0, payload))
                elif kind == GOAWAY:
                    self.goaway.set()
                elif kind == RST_STREAM or (kind == HEADERS and flags & END_STREAM):
                    with self.changed:
                        self.ended.add(int.from_bytes(head[5:9], "big") & 0x7FFFFFFF)
                        self.changed.notify_all()
        except OSError:
            pass
        finally:
            self.closed.set()
            with self.changed:
                self.changed.notify_all()

    def wait_ended(self, streams: list[int], timeout: float) -> bool:
        """True once the server has ended every one of ``streams`` (or closed the
        connection) within ``timeout`` seconds."""
        with self.changed:
            return self.changed.wait_for(
                lambda: self.closed.is_set() or set(streams) <= self.ended, timeout
            )

    def open_call(
        self,
        method: str,
        body: bytes = b"",
        end_stream: bool = False,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> int:
        """Opens a gRPC call to ``method`` ("/pkg.Service/Method"): its headers (and
        ``headers``, e.g. ``("grpc-timeout", "200m")``), then ``body`` (possibly a part of a
        framed message) in one DATA frame if not empty. Returns the stream id."""
        stream = self._next_stream
        self._next_stream += 2
        block = hpack_literal(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", method),
                (":authority", self.authority),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                *headers,
            ]
        )
        data = frame(HEADERS, END_HEADERS, stream, block)
        if body or end_stream:
            data += frame(DATA, END_STREAM if end_stream else 0, stream, body)
        self._send(data)
        return stream

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def __enter__(self) -> RawH2Connection:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
