"""The AES-256-CBC stream: known answers, round trips, uniform failure, bounded memory."""

from __future__ import annotations

import io
import os
import subprocess
import tracemalloc

import pytest

from imageunlock.engine.crypto import (
    decrypt_stream,
    decrypt_with_key,
    derive_key,
    encrypt_stream,
    encrypt_with_key,
)
from imageunlock.errors import ARCHIVE_ERROR_MESSAGE, ArchiveError

# NIST SP 800-38A, F.2.5/F.2.6 (CBC-AES256): four blocks, no padding.
SP800_38A_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
SP800_38A_IV = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
SP800_38A_PLAIN = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
SP800_38A_CIPHER = bytes.fromhex(
    "f58c4c04d6e5f1ba779eabfb5f7bfbd6"
    "9cfc4e967edb808d679f777bc6702c7d"
    "39f23369a9d9bacfa530e26304231461"
    "b2eb05e2c39be9fcda6c19078c6a9d1b"
)
# NIST CAVP AESAVS known-answer tests, CBC, 256-bit key = 0, IV = 0 (CBCVarTxt256 #0, CBCGFSbox256 #0).
CAVP = [
    ("80000000000000000000000000000000", "ddc6bf790c15760d8d9aeb6f9a75fd4e"),
    ("014730f80ac625fe84f026c60bfd547d", "5c9d844ed46f9885085e5d6a4f94c7d7"),
]


def _decrypt_all(data: bytes, fragment: bytes, **kw) -> bytes:
    return b"".join(decrypt_stream(io.BytesIO(data), fragment, **kw))


def _encrypt_all(data: bytes, fragment: bytes, iv: bytes | None = None) -> bytes:
    return b"".join(encrypt_stream([data], fragment, iv=iv))


def _openssl(args: list[str], data: bytes) -> bytes:
    return subprocess.run(["openssl", "enc", *args], input=data, capture_output=True, check=True).stdout


def test_sp800_38a_vector_encrypts_to_the_published_ciphertext():
    ours = b"".join(encrypt_with_key([SP800_38A_PLAIN], SP800_38A_KEY, iv=SP800_38A_IV))
    assert ours[:16] == SP800_38A_IV
    assert ours[16:80] == SP800_38A_CIPHER
    assert len(ours) == 16 + 64 + 16  # a whole block of PKCS7 padding follows


def test_sp800_38a_vector_decrypts_from_openssl_output():
    body = _openssl(["-aes-256-cbc", "-K", SP800_38A_KEY.hex(), "-iv", SP800_38A_IV.hex()], SP800_38A_PLAIN)
    assert body[:64] == SP800_38A_CIPHER  # openssl agrees with NIST: a trustworthy oracle
    plain = b"".join(decrypt_with_key(io.BytesIO(SP800_38A_IV + body), SP800_38A_KEY))
    assert plain == SP800_38A_PLAIN


@pytest.mark.parametrize("plain_hex, cipher_hex", CAVP)
def test_cavp_known_answers(plain_hex: str, cipher_hex: str):
    key, iv = bytes(32), bytes(16)
    out = b"".join(encrypt_with_key([bytes.fromhex(plain_hex)], key, iv=iv))
    assert out[16:32].hex() == cipher_hex
    assert b"".join(decrypt_with_key(io.BytesIO(out), key)) == bytes.fromhex(plain_hex)


def test_key_is_sha256_of_fragment():
    fragment = os.urandom(40)
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-binary"], input=fragment, capture_output=True, check=True
    ).stdout
    assert derive_key(fragment) == digest
    with pytest.raises(ArchiveError):
        derive_key(b"")


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 65535, 65536, 65537, 200_003])
def test_round_trip_and_openssl_interop(size: int):
    fragment, iv = os.urandom(32), os.urandom(16)
    data = os.urandom(size)
    ours = _encrypt_all(data, fragment, iv)
    theirs = iv + _openssl(["-aes-256-cbc", "-K", derive_key(fragment).hex(), "-iv", iv.hex()], data)
    assert ours == theirs
    assert _decrypt_all(theirs, fragment) == data
    # and openssl decrypts ours
    assert _openssl(["-d", "-aes-256-cbc", "-K", derive_key(fragment).hex(), "-iv", iv.hex()], ours[16:]) == data


def test_progress_reports_ciphertext_bytes_consumed():
    fragment = os.urandom(8)
    archive = _encrypt_all(os.urandom(300_000), fragment)
    seen: list[int] = []
    _decrypt_all(archive, fragment, on_progress=seen.append)
    assert seen == sorted(seen)
    assert seen[-1] == len(archive)


def _corruptions(archive: bytes) -> dict[str, bytes]:
    bad_padding = bytearray(archive)
    bad_padding[-17] ^= 0x01  # flips the last plaintext byte: the pad length
    return {
        "bad padding": bytes(bad_padding),
        "truncated by one block": archive[:-16],
        "truncated mid block": archive[:-5],
        "only the IV": archive[:16],
        "shorter than an IV": archive[:7],
        "empty": b"",
    }


def test_every_failure_is_one_error_with_one_message():
    fragment = os.urandom(32)
    archive = _encrypt_all(os.urandom(100_000), fragment)
    cases = _corruptions(archive)
    cases["wrong key"] = archive
    messages = set()
    for name, data in cases.items():
        key = os.urandom(32) if name == "wrong key" else fragment
        with pytest.raises(ArchiveError) as info:
            _decrypt_all(data, key)
        error = info.value  # no chained cause that could say "padding" in a traceback
        assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__), name
        messages.add(str(info.value))
    assert messages == {ARCHIVE_ERROR_MESSAGE}
    assert "padding" not in ARCHIVE_ERROR_MESSAGE.lower()


def test_error_text_never_holds_key_material():
    fragment = b"canary-fragment-" + os.urandom(8).hex().encode()
    with pytest.raises(ArchiveError) as info:
        _decrypt_all(b"\0" * 40, fragment)
    text = str(info.value) + repr(info.value)
    assert fragment.decode() not in text
    assert derive_key(fragment).hex() not in text


class _LazyArchive(io.RawIOBase):
    """A large archive produced on the fly, so the test itself holds nothing big."""

    def __init__(self, fragment: bytes, size: int) -> None:
        block = b"\xa5" * 65536
        self._stream = encrypt_stream((block for _ in range(size // len(block))), fragment)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while len(self._buf) < n:
            try:
                self._buf += next(self._stream)
            except StopIteration:
                break
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def test_memory_stays_bounded_whatever_the_archive_size():
    fragment = os.urandom(32)
    size = 64 << 20
    tracemalloc.start()
    try:
        total = sum(len(c) for c in decrypt_stream(_LazyArchive(fragment, size), fragment))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert peak < 2 << 20, f"peak {peak} bytes for a {size}-byte archive"
