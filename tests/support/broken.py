"""Encrypted archives damaged after encryption (on disk, in transit): a flipped bit in the IV,
the middle or the last block, bad padding, truncation; plus a plaintext that is no image tar
and the right archive under a wrong key. Each must fail the same way and load nothing."""

from __future__ import annotations

import os
from pathlib import Path

from imageunlock.engine.crypto import encrypt_stream

from .images import ArchiveSet


def flip(data: bytes, pos: int) -> bytes:
    """``data`` with the lowest bit of byte ``pos`` flipped."""
    changed = bytearray(data)
    changed[pos] ^= 0x01
    return bytes(changed)


def broken_archives(archives: ArchiveSet, workdir: Path) -> dict[str, Path]:
    """``{case: archive file}`` written to ``workdir``; for ``"wrong key"`` the file is the
    intact openssl archive: the test serves it another fragment."""
    raw = archives.openssl_archive.read_bytes()
    middle = len(raw) // 2
    not_a_tar = b"".join(encrypt_stream([os.urandom(200_000)], archives.fragment))
    variants = {
        "bad padding": flip(raw, len(raw) - 17),
        "flipped IV byte": flip(raw, 3),
        "flipped middle byte": flip(raw, middle),
        "flipped last block": flip(raw, len(raw) - 5),
        "truncated": raw[: len(raw) - 4096],
        "not an image tar": not_a_tar,
    }
    paths = {}
    for name, data in variants.items():
        path = workdir / (name.replace(" ", "-") + ".enc")
        path.write_bytes(data)
        paths[name] = path
    paths["wrong key"] = archives.openssl_archive
    return paths
