"""Property-based fuzzing of decrypt + unpack: random and mutated archives.

Whatever the input: no crash, never a success for damaged ciphertext, and every failure
is the uniform ArchiveError (or, for a tar that is intact but lacks a requested image or
tags something else, the named ImagesNotInArchiveError or ForeignTagsError).
"""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imageunlock.engine.crypto import decrypt_stream, encrypt_stream
from imageunlock.engine.dockersave import ImageTarVerifier, verified_stream
from imageunlock.errors import ARCHIVE_ERROR_MESSAGE, ArchiveError, ForeignTagsError, ImagesNotInArchiveError

from ..support import savetar

TAGS = ["azaion/flights:3.1", "azaion/detections:3.1"]
FRAGMENT = b"fuzzing fragment"
PLAIN = savetar.build(TAGS, layer_bytes=700, share_first_layer=True)
ARCHIVE = b"".join(encrypt_stream([PLAIN], FRAGMENT, iv=bytes(16)))
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def unlock(archive: bytes, chunk: int = 4096) -> bytes:
    source = io.BytesIO(archive)
    out = bytearray()
    for piece in verified_stream(decrypt_stream(source, FRAGMENT, chunk_size=chunk), ImageTarVerifier(), TAGS):
        out += piece
    return bytes(out)


def assert_uniform_failure(archive: bytes, chunk: int = 4096) -> None:
    try:
        unlock(archive, chunk)
    except ArchiveError as exc:
        assert str(exc) == ARCHIVE_ERROR_MESSAGE
        return
    except ImagesNotInArchiveError as exc:
        assert set(exc.missing) <= set(TAGS)
        return
    except ForeignTagsError:  # e.g. a garbled but still valid name in ``repositories``
        return
    raise AssertionError("a damaged archive was accepted")


def test_the_intact_archive_unlocks():
    assert unlock(ARCHIVE) == PLAIN


@FUZZ
@given(st.binary(max_size=20_000))
def test_random_bytes_never_unlock(data):
    assert_uniform_failure(data)


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(ARCHIVE) - 1), st.integers(1, 255)),
        min_size=1,
        max_size=4,
        unique_by=lambda flip: flip[0],
    ),
    st.sampled_from([16, 513, 4096, 65536]),
)
def test_flipped_ciphertext_never_unlocks(flips, chunk):
    data = bytearray(ARCHIVE)
    for pos, mask in flips:
        data[pos] ^= mask
    assert_uniform_failure(bytes(data), chunk)


@FUZZ
@given(st.integers(0, len(ARCHIVE) - 1))
def test_truncation_never_unlocks(cut):
    assert_uniform_failure(ARCHIVE[:cut])


@FUZZ
@given(st.binary(min_size=1, max_size=4096))
def test_appended_junk_never_unlocks(junk):
    assert_uniform_failure(ARCHIVE + junk)


@FUZZ
@given(st.integers(0, len(PLAIN) - 1), st.integers(1, 255))
def test_plaintext_mutations_fail_uniformly_or_change_nothing_that_loads(pos, mask):
    """Re-encrypted damage (as if the publisher's tar was corrupt): an error, or — for a byte
    no tar reader looks at — exactly the original images."""
    data = bytearray(PLAIN)
    data[pos] ^= mask
    archive = b"".join(encrypt_stream([bytes(data)], FRAGMENT, iv=bytes(16)))
    try:
        unlock(archive)
    except ArchiveError as exc:
        assert str(exc) == ARCHIVE_ERROR_MESSAGE
        return
    except (ImagesNotInArchiveError, ForeignTagsError):
        return
    verifier = ImageTarVerifier()
    verifier.feed(bytes(data))
    assert verifier.close().images == savetar.config_ids(PLAIN)
