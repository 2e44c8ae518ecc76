"""The image-archive check (``imageunlock.engine.dockersave``) driven over an in-memory archive the
way the unlock drives it: fed in chunks, or streamed through on the way to the runtime."""

from __future__ import annotations

import pytest

from imageunlock.engine.dockersave import ImageTarVerifier, verified_stream
from imageunlock.errors import UnlockError

from .tarbuild import TAGS


def verify(data: bytes, chunk: int = 4096) -> dict[str, str]:
    """Feed ``data`` to the verifier ``chunk`` bytes at a time; the images it found."""
    verifier = ImageTarVerifier()
    for i in range(0, len(data), chunk):
        verifier.feed(data[i : i + chunk])
    return verifier.close().images


def streamed(data: bytes, expected: list[str] = TAGS) -> bytes:
    """What reaches the runtime; raises like the real upload would."""
    out = bytearray()
    chunks = [data[i : i + 2048] for i in range(0, len(data), 2048)]
    for chunk in verified_stream(chunks, ImageTarVerifier(), expected):
        out += chunk
    return bytes(out)


def refused(data: bytes, error: type[UnlockError] = UnlockError, expected: list[str] = TAGS) -> UnlockError:
    """Assert the stream raises ``error`` before the end-of-archive marker went out; the error."""
    sent = []
    with pytest.raises(error) as info:
        for chunk in verified_stream(
            [data[i : i + 2048] for i in range(0, len(data), 2048)], ImageTarVerifier(), expected
        ):
            sent.append(chunk)
    assert sum(map(len, sent)) <= len(data) - 1024  # the end-of-archive marker never went out
    return info.value
