"""The streaming tar reader, through the image-archive check: caps, framing, and the tar read as
the Engine reads it (Go's archive/tar, moby's untar)."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tracemalloc

import pytest

from imageunlock.engine.dockersave import ImageTarVerifier
from imageunlock.errors import ArchiveError

from ..support import savetar
from ..support.tarbuild import TAGS, add_repo_tag, append, manifest_of, member, pax, rewrite
from ..support.tarcheck import refused, verify

# -- not a whole tar -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"not a tar at all" * 100, bytes(2048), os.urandom(10_000)],
    ids=["empty", "text", "only-zero-blocks", "random"],
)
def test_non_archives_are_rejected(data: bytes):
    with pytest.raises(ArchiveError):
        verify(data)


@pytest.mark.parametrize("cut", [1, 512, 1024, 5000])
def test_truncated_archive_is_rejected(cut: int):
    data = savetar.build(TAGS)
    with pytest.raises(ArchiveError):
        verify(data[: len(data) - 10240 - cut])  # tarfile pads the end to a 10 KiB record


# -- bounded work and memory, whatever the entries ------------------------------------------


def test_a_flood_of_entries_stops_at_the_cap_with_bounded_memory():
    flood = [member(f"e{i}") for i in range(20_000)]  # empty files: twice the cap
    fed = 0
    verifier = ImageTarVerifier()
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveError):
            for header in flood:
                fed += 1
                verifier.feed(header)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        verifier.abort()
    assert fed == 10_001  # refused at the first header past the cap, not at the end
    assert peak < 16 << 20


@pytest.mark.parametrize(
    "fmt, field",
    [
        (tarfile.PAX_FORMAT, "name"),
        (tarfile.PAX_FORMAT, "linkname"),
        (tarfile.GNU_FORMAT, "name"),
        (tarfile.GNU_FORMAT, "linkname"),
    ],
)
def test_a_name_longer_than_path_max_is_refused_at_once(fmt, field):
    info = tarfile.TarInfo("x")
    info.type = tarfile.SYMTYPE if field == "linkname" else tarfile.REGTYPE
    setattr(info, field, "d/" * 2100 + "x")  # 4201 bytes: within the extended-header cap, over PATH_MAX
    verifier = ImageTarVerifier()
    with pytest.raises(ArchiveError):
        verifier.feed(info.tobuf(fmt) + bytes(8192))  # raised while feeding, not at close()
    verifier.abort()


def test_an_oversized_extended_header_is_refused_at_its_header():
    header = pax({"comment": "x" * (100 << 10)})  # 100 KiB: over the 64 KiB cap
    verifier = ImageTarVerifier()
    with pytest.raises(ArchiveError):
        verifier.feed(header[:512])
    verifier.abort()


# -- the tar as the Engine reads it (Go's archive/tar, moby's untar) ------------------------
# Each archive below shows the checks one manifest.json (all refs requested) while the Engine,
# reading the same bytes, would load another that also tags nginx:latest.


def _evil_manifest(data: bytes) -> bytes:
    return json.dumps(add_repo_tag(manifest_of(data))).encode()


def _benign_manifest(data: bytes) -> bytes:
    return json.dumps(manifest_of(data)).encode()


def _data_after_directory(data):
    hidden = member("manifest.json", _evil_manifest(data))  # Go reads a directory's "data" as headers
    return append(data, member("d", hidden, kind=tarfile.DIRTYPE))


def _symlink_then_file(data):
    return append(
        data,
        member("m.json", _benign_manifest(data)),
        member("manifest.json", kind=tarfile.SYMTYPE, linkname="m.json"),
        member("manifest.json", _evil_manifest(data)),
    )


def _hard_link_keeps_the_old_file(data):
    return append(
        data,
        member("m.json", _evil_manifest(data)),
        member("manifest.json", kind=tarfile.LNKTYPE, linkname="m.json"),
        member("m.json", _benign_manifest(data)),
    )


def _written_through_a_symlink(data):
    return append(
        data, member("d", kind=tarfile.SYMTYPE, linkname="."), member("d/manifest.json", _evil_manifest(data))
    )


def _second_pax_header_replaces_the_first(data):
    return append(
        data, pax({"path": "other.json"}), pax({"comment": "x"}), member("manifest.json", _evil_manifest(data))
    )


def _gnu_long_name_beats_pax(data):
    long_name = tarfile.TarInfo._create_gnu_long_header("manifest.json", tarfile.GNUTYPE_LONGNAME, "utf-8", "strict")
    return append(data, long_name, pax({"path": "other.json"}), member("x.json", _evil_manifest(data)))


def _gnu_sparse_rename(data):
    evil = _evil_manifest(data)
    records = {
        "GNU.sparse.major": "0",
        "GNU.sparse.minor": "1",
        "GNU.sparse.name": "manifest.json",
        "GNU.sparse.size": str(len(evil)),
        "GNU.sparse.numblocks": "1",
        "GNU.sparse.map": f"0,{len(evil)}",
    }
    blob = "blobs/sha256/" + hashlib.sha256(evil).hexdigest()  # a well-addressed blob, to us
    return append(data, pax(records), member(blob, evil))


def _star_prefix(data):
    prefix = "a" * 60 + "/" + "b" * 70  # 131 bytes
    block = bytearray(member("manifest.json", _evil_manifest(data))[:512])
    block[345:476] = prefix.encode()  # no NUL: Go stops at 476 in a star header, we read on
    block[476:500] = b"00000000000\0" * 2  # star's atime and ctime
    block[508:512] = b"tar\0"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    body = member("manifest.json", _evil_manifest(data))[512:]
    return append(data, member(prefix, kind=tarfile.SYMTYPE, linkname=".."), bytes(block) + body)


def _symlink_climbing_out_of_a_symlink(data):
    evil, benign = _evil_manifest(data), _benign_manifest(data)
    return append(
        rewrite(data, "manifest.json", lambda body: None),
        member("d", kind=tarfile.SYMTYPE, linkname="sub/deep"),
        member("sub/m.json", evil),
        member("m.json", benign),
        member("manifest.json", kind=tarfile.SYMTYPE, linkname="d/../m.json"),
    )


def _hard_link_to_a_symlink(data):
    evil, benign = _evil_manifest(data), _benign_manifest(data)
    return append(
        rewrite(data, "manifest.json", lambda body: None),
        member("m.json", evil),
        member("sub/m.json", benign),
        member("sub/l", kind=tarfile.SYMTYPE, linkname="m.json"),
        member("manifest.json", kind=tarfile.LNKTYPE, linkname="sub/l"),
    )


@pytest.mark.parametrize(
    "craft",
    [
        _data_after_directory,
        _symlink_then_file,
        _hard_link_keeps_the_old_file,
        _written_through_a_symlink,
        _second_pax_header_replaces_the_first,
        _gnu_long_name_beats_pax,
        _gnu_sparse_rename,
        _star_prefix,
        _symlink_climbing_out_of_a_symlink,
        _hard_link_to_a_symlink,
    ],
    ids=lambda craft: craft.__name__.strip("_"),
)
def test_archive_the_engine_would_read_differently_is_refused(craft):
    refused(craft(savetar.build(TAGS)))


def test_a_plaintext_that_is_also_a_compressed_stream_is_refused():
    """Adversarial review: R is a valid tar holding only the requested image, and an xz
    stream that the Engine decompresses into another archive tagging nginx:latest."""
    from ..support.polyglot import xz_polyglot

    polyglot, _engines_view = xz_polyglot()
    verifier = ImageTarVerifier()
    with pytest.raises(ArchiveError):
        verifier.feed(polyglot)
        verifier.close()


@pytest.mark.parametrize(
    "magic",
    [b"BZh91AY", b"\x1f\x8b\x08\x00", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"\x50\x2a\x4d\x18", b"\x5f\x2a\x4d\x18"],
)
def test_every_compression_magic_the_engine_detects_is_refused(magic):
    from imageunlock.engine.tarstream import TarReader, looks_compressed

    assert looks_compressed(magic + bytes(16))
    reader = TarReader()
    block = bytearray(512)
    block[: len(magic)] = magic
    with pytest.raises(ArchiveError):
        reader.feed(bytes(block))  # refused at the first block, before any header parsing
