"""Streaming AES-CBC with PKCS#7 padding and SHA-256 of the plaintext, in one pass.

The one implementation for the client: Capgo v2 bundles, v1 (legacy) bundles and delta
files all encrypt and decrypt here. Constant memory: 1 MiB chunks.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from typing import IO, Final

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmsign._internal.progress import Progress

AES_BLOCK: Final = 16
CHUNK_BYTES: Final = 1 << 20
#: From this size up a small input is hashed on a second thread while it is encrypted.
PARALLEL_HASH_BYTES: Final = 256 << 10

#: Sees every plaintext chunk, in order (a checksum the caller keeps).
PlainObserver = Callable[[bytes], None]


class BadPadding(ValueError):
    """The ciphertext does not end in valid PKCS#7 padding (wrong key or IV, or modified)."""


class _BackgroundHasher:
    """SHA-256 over chunks in a second thread, overlapping the AES pass and the file I/O.

    hashlib releases the GIL on large buffers, so hashing chunk i runs while the main thread
    reads, encrypts and writes; buffers return to the free pool once hashed.
    """

    def __init__(self, buffers: int, size: int) -> None:
        self.digest = hashlib.sha256()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._size, self._spare = size, buffers  # allocated on demand: small files need few
        self._thread = threading.Thread(target=self._run, name="hsmsign-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buf, n = item
            try:
                if self._error is None:
                    self.digest.update(memoryview(buf)[:n])
            except BaseException as e:  # reported to the main thread in close()
                self._error = e
            self._free.put(buf)

    def take(self) -> bytearray:
        if self._spare and self._free.empty():
            self._spare -= 1
            return bytearray(self._size)
        return self._free.get()

    def give(self, buf: bytearray, n: int) -> None:
        self._todo.put((buf, n))

    def close(self) -> bytes:
        self._todo.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self.digest.digest()


def encrypt_stream(
    src: IO[bytes],
    dst: IO[bytes],
    key: bytes,
    iv: bytes,
    total: int,
    progress: Progress | None = None,
    regular: bool = False,
) -> bytes:
    """Hash and AES-CBC/PKCS#7-encrypt src into dst in one pass; returns sha256(plain).

    ``regular`` says src is a regular file of ``total`` bytes (then a small one is read at
    once). Raises OSError.
    """
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    if regular and total <= 2 * CHUNK_BYTES:  # one read: no chunk pipeline needed
        plain = src.read()
        hashed: list[bytes] = []
        hash_thread = None
        if len(plain) >= PARALLEL_HASH_BYTES:
            # hashlib releases the GIL: SHA-256 runs beside AES.
            hash_thread = threading.Thread(
                target=lambda: hashed.append(hashlib.sha256(plain).digest()), name="hsmsign-sha256"
            )
            hash_thread.start()
        try:
            pad = AES_BLOCK - len(plain) % AES_BLOCK
            dst.write(enc.update(plain))  # written as it is: no copy into one buffer
            dst.write(enc.update(bytes([pad]) * pad) + enc.finalize())
        finally:
            if hash_thread is not None:
                hash_thread.join()
        if progress is not None:
            progress(len(plain), total)
        return hashed[0] if hash_thread is not None else hashlib.sha256(plain).digest()
    outbuf = bytearray(CHUNK_BYTES + AES_BLOCK)
    outview = memoryview(outbuf)
    hasher = _BackgroundHasher(4, CHUNK_BYTES)
    done = 0
    try:
        while True:
            buf = hasher.take()
            n = src.readinto(buf)  # type: ignore[attr-defined]
            if not n:
                break
            hasher.give(buf, n)  # read-only from here on: the hasher owns buf until returned
            k = enc.update_into(memoryview(buf)[:n], outbuf)
            dst.write(outview[:k])
            done += n
            if progress is not None:
                progress(done, total)
    finally:
        digest = hasher.close()
    pad = AES_BLOCK - done % AES_BLOCK
    dst.write(enc.update(bytes([pad]) * pad) + enc.finalize())
    return digest


def decrypt_stream(
    src: IO[bytes],
    dst: IO[bytes] | None,
    key: bytes,
    iv: bytes,
    total: int,
    progress: Progress | None = None,
    observe: PlainObserver | None = None,
) -> tuple[bytes, int]:
    """AES-CBC/PKCS#7-decrypt src (``total`` bytes) into dst (None: only check it).

    Returns (sha256 of the plaintext, plaintext size); ``observe`` sees each plaintext
    chunk too. Raises BadPadding, OSError.
    """
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    digest = hashlib.sha256()
    inbuf = bytearray(CHUNK_BYTES)
    outbuf = bytearray(CHUNK_BYTES + AES_BLOCK)
    inview, outview = memoryview(inbuf), memoryview(outbuf)
    held = b""  # the last plaintext block is held back until we know it carries the padding
    size = done = 0

    def emit(data: bytes | memoryview) -> None:
        digest.update(data)
        if observe is not None:
            observe(bytes(data))
        if dst is not None:
            dst.write(data)

    while True:
        n = src.readinto(inbuf)  # type: ignore[attr-defined]
        if not n:
            break
        done += n
        if progress is not None:
            progress(done, total)
        k = dec.update_into(inview[:n], outbuf)
        if k == 0:
            continue
        out = outview[:k]
        chunk = held + bytes(out[: k - AES_BLOCK]) if held else out[: k - AES_BLOCK]
        held = bytes(out[k - AES_BLOCK :])
        emit(chunk)
        size += len(chunk)
    tail = held + dec.finalize()
    pad = tail[-1] if tail else 0
    if not tail or not 1 <= pad <= AES_BLOCK or tail[-pad:] != bytes([pad]) * pad:
        raise BadPadding("bad PKCS#7 padding")
    last = tail[:-pad]
    emit(last)
    return digest.digest(), size + len(last)


def encrypt_bytes(data: bytes, key: bytes, iv: bytes) -> bytes:
    """AES-CBC/PKCS#7 of a small buffer (a delta file)."""
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    pad = AES_BLOCK - len(data) % AES_BLOCK
    return enc.update(data) + enc.update(bytes([pad]) * pad) + enc.finalize()


def decrypt_bytes(data: bytes, key: bytes, iv: bytes) -> bytes:
    """Inverse of encrypt_bytes. Raises BadPadding (also for a size not a multiple of 16)."""
    if not data or len(data) % AES_BLOCK:
        raise BadPadding("size is not a multiple of 16")
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    plain = dec.update(data) + dec.finalize()
    pad = plain[-1]
    if not 1 <= pad <= AES_BLOCK or plain[-pad:] != bytes([pad]) * pad:
        raise BadPadding("bad PKCS#7 padding")
    return plain[:-pad]
