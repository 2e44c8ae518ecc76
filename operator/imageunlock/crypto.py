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
import os
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Protocol

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import ArchiveError

Progress = Callable[[int], None]

CHUNK_SIZE = 64 * 1024
IV_SIZE = 16
BLOCK_SIZE = 16


def derive_key(fragment: bytes) -> bytes:
    """The AES-256 key is the SHA-256 of the key fragment served by the resource API."""
    if not fragment:
        raise ArchiveError()
    return hashlib.sha256(fragment).digest()


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


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
    """:func:`decrypt_stream` with the AES-256 key itself (for known-answer tests)."""
    if len(key) != 32:
        raise ArchiveError()
    iv = source.read(IV_SIZE)
    if len(iv) != IV_SIZE:
        raise ArchiveError()
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    consumed = IV_SIZE
    total_ciphertext = 0
    try:
        while True:
            block = source.read(chunk_size)
            if not block:
                break
            consumed += len(block)
            total_ciphertext += len(block)
            out = unpadder.update(decryptor.update(block))
            if on_progress is not None:
                on_progress(consumed)
            if out:
                yield out
        if total_ciphertext == 0 or total_ciphertext % BLOCK_SIZE:
            raise ArchiveError()
        tail = unpadder.update(decryptor.finalize()) + unpadder.finalize()
    except ArchiveError:
        raise
    except ValueError:
        # cryptography reports bad padding and short input as ValueError: fold it.
        raise ArchiveError() from None
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
