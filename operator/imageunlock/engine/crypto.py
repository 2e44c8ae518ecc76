"""AES-256-CBC archive stream (pure: no I/O beyond the file object it is given).

Archive format (the Loader's, unchanged): ``IV (16 bytes) || AES-256-CBC(PKCS7(plaintext))``
with ``key = SHA-256(fragment)``. Decryption is a generator of plaintext chunks so the
plaintext can go straight into the container runtime without touching disk; memory stays
bounded by the chunk size whatever the archive size.

Every failure here is raised as :class:`ArchiveError` with one fixed message. A
distinguishable "bad padding" answer would be a padding oracle, and an error text must never
carry key material, so the cause is deliberately dropped (``from None``).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from imageunlock.errors import ArchiveError

Progress = Callable[[int], None]

# A read size, not a format. Each chunk becomes a new bytes object twice (the cipher's output,
# then the HTTP chunk framing): 128 KiB keeps that in malloc's reused heap and per-chunk
# overhead low; from 256 KiB on, fresh mappings page-fault (make bench: more sys time).
CHUNK_SIZE = 128 * 1024
IV_SIZE = 16
BLOCK_SIZE = 16


def derive_key(fragment: bytes) -> bytes:
    """The AES-256 key is the SHA-256 of the key fragment served by the resource API."""
    if not fragment:
        raise ArchiveError()
    return hashlib.sha256(fragment).digest()


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


# Sources read straight into the decryptor's buffer (a file: no new bytes per read). Others
# (a hashing wrapper, a test's generator) are read with read().
_READINTO = (io.FileIO, io.BufferedReader, io.BytesIO)


def decrypt_stream(
    source: Readable,
    fragment: bytes,
    *,
    chunk_size: int = CHUNK_SIZE,
    on_progress: Progress | None = None,
) -> Iterator[bytes]:
    """Yield the plaintext of ``source`` chunk by chunk.

    ``on_progress`` receives the number of ciphertext bytes consumed so far (IV included),
    which a caller compares with the file size for a percentage.
    """
    return decrypt_with_key(source, derive_key(fragment), chunk_size=chunk_size, on_progress=on_progress)


def decrypt_with_key(
    source: Readable,
    key: bytes,
    *,
    chunk_size: int = CHUNK_SIZE,
    on_progress: Progress | None = None,
) -> Iterator[bytes]:
    """:func:`decrypt_stream` with the AES-256 key itself (for known-answer tests).

    One copy per chunk, by the cipher: a file is read into one reused buffer, and the PKCS7
    padding is checked and cut off the last chunk alone (each chunk is held back until the
    next one is decrypted, so the last one is known when it comes).
    """
    if len(key) != 32:
        raise ArchiveError()
    iv = source.read(IV_SIZE)
    if len(iv) != IV_SIZE:
        raise ArchiveError()
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    buffer = memoryview(bytearray(chunk_size))
    readinto = source.readinto if isinstance(source, _READINTO) else None
    consumed = IV_SIZE
    held = b""  # the last plaintext so far: it ends with the padding if nothing follows
    try:
        while True:
            if readinto is not None:
                got = readinto(buffer)
                block: bytes | memoryview = buffer[:got]
            else:
                block = source.read(chunk_size)
                got = len(block)
            if not got:
                break
            consumed += got
            out = decryptor.update(block)
            if on_progress is not None:
                on_progress(consumed)
            if out:
                if held:
                    yield held
                held = out
        decryptor.finalize()  # raises unless the ciphertext was whole blocks
        if not held:
            raise ArchiveError()
        unpadder = padding.PKCS7(BLOCK_SIZE * 8).unpadder()
        last = unpadder.update(held[-BLOCK_SIZE:]) + unpadder.finalize()
    except ArchiveError:
        raise
    except ValueError:
        # cryptography reports bad padding and short input as ValueError: fold it.
        raise ArchiveError() from None
    tail = held[: len(held) - BLOCK_SIZE + len(last)]
    if tail:
        yield tail


def encrypt_stream(chunks: Iterable[bytes], fragment: bytes, *, iv: bytes | None = None) -> Iterator[bytes]:
    """The inverse of :func:`decrypt_stream`: ``IV || AES-256-CBC(PKCS7(data))``.

    Used by ``imageunlock encrypt`` (the publishing side) and the tests; the tests also make
    archives with ``openssl enc`` so the two directions cannot share a mistake.
    """
    return encrypt_with_key(chunks, derive_key(fragment), iv=iv)


def encrypt_with_key(chunks: Iterable[bytes], key: bytes, *, iv: bytes | None = None) -> Iterator[bytes]:
    iv = os.urandom(IV_SIZE) if iv is None else iv
    if len(iv) != IV_SIZE:
        raise ValueError("IV must be 16 bytes")
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    padder = padding.PKCS7(128).padder()
    yield iv
    for chunk in chunks:
        out = encryptor.update(padder.update(chunk))
        if out:
            yield out
    yield encryptor.update(padder.finalize()) + encryptor.finalize()


def read_chunks(source: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    while block := source.read(chunk_size):
        yield block
