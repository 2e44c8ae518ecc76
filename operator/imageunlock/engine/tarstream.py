"""A streaming tar reader that reads the bytes as the Engine will (Go's archive/tar, moby's untar).

:class:`TarReader` takes the archive in chunks of any size and never holds more than one
512-byte header, the small files it keeps and the bookkeeping below; it records, per member,
its type, the SHA-256 of every regular file's content (hashed as it passes, on the caller's
thread: a worker thread's hand-offs cost more CPU than they saved) and the content of regular
files up to ``MAX_META_FILE``, and resolves links as the Engine's untar would. What those
files mean is the caller's business (:mod:`imageunlock.engine.dockersave` checks a ``docker save``
archive with them).

It refuses what Go's archive/tar and moby's untar could read otherwise, so the files recorded
are the files the Engine writes: a bad header checksum, a non-``ustar`` magic, a non-octal
numeric field (GNU base-256 sizes are read), data after a directory, link or device header
(to Go, more headers), a name given twice, a member below a non-directory (:meth:`TarReader.close`),
a symlink climbing out of another, a hard link to a link, sparse files, non-zero padding or
anything but zero blocks after the end marker. Pax and GNU long-name/link records are applied
as Go applies them (the last pax header, then a non-empty GNU name); star's shorter prefix
field is read as Go reads it.

Memory and time are bounded: ``MAX_ENTRIES`` headers, names and link targets up to ``MAX_NAME``
bytes, extended headers up to ``MAX_EXT_HEADER``, then names and kept files (each
≤ ``MAX_META_FILE``) up to ``MAX_META_TOTAL`` in all — each refused as soon as crossed.

Any problem raises :class:`~imageunlock.errors.ArchiveError` — the same single message as a
decryption failure, because with a wrong key the two are indistinguishable anyway.
"""

from __future__ import annotations

import hashlib
import itertools
import posixpath
import re
from dataclasses import dataclass, field
from typing import Protocol

from imageunlock.errors import ArchiveError

BLOCK = 512
MAX_META_FILE = 1 << 20  # configs, manifests, index: far below this in practice
MAX_META_TOTAL = 64 << 20  # kept in memory: metadata files and member names
# docker save writes 1-4 members per layer (legacy <id>/, VERSION, json, layer.tar; OCI one
# blob) and a few per image, and an image has at most 127 layers (overlay2): even seven such
# images with a pax header before every member stay under 10,000 (real sets: a few hundred).
# A header costs ~100 bytes and ~70 µs, so the cap bounds the verifier to MBs and a second.
MAX_ENTRIES = 10_000
MAX_NAME = 4096  # bytes in a member name or link target: PATH_MAX
MAX_EXT_HEADER = 64 << 10  # a pax / GNU long-name record holds a name or two
_REGULAR = (b"0", b"\0", b"7")
_HEADER_ONLY = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: Go reads no data
_EXT = (b"x", b"g", b"L", b"K")  # pax (next member, global), GNU long name / link target
_PAX_KEYS = ("path", "linkpath", "size")


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def hexdigest(self) -> str: ...


@dataclass
class _Member:
    name: str
    size: int
    kind: bytes
    linkname: str = ""


def norm_name(name: str) -> str:
    """A member name as the Engine writes it: relative to the archive root, normalised."""
    name = posixpath.normpath(name.lstrip("/")) if name else name
    return "" if name == "." else name


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for large sizes
        value = int.from_bytes(field_bytes, "big") & ~(0x80 << (8 * (len(field_bytes) - 1)))
        return value
    text = field_bytes.rstrip(b"\0 ").lstrip(b" \0")
    if not text:
        return 0
    if not re.fullmatch(rb"[0-7]+", text):
        raise ArchiveError()
    return int(text, 8)


def _text(raw: bytes) -> str:
    """A name or pax value: UTF-8 or refused. Go reads invalid bytes as U+FFFD where Python
    would keep them, so the Engine and this check could name different files."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveError() from None


def _parse_header(block: bytes) -> _Member:
    stored = _octal(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 8 * 32
    if stored not in (unsigned, signed):
        raise ArchiveError()
    if block[257:262] != b"ustar":
        raise ArchiveError()
    # Numeric fields must be octal and names text: a garbled header block cannot slip by.
    for start, end in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
        _octal(block[start:end])
    for start, end in ((265, 297), (297, 329)):  # uname, gname
        text = block[start:end].split(b"\0", 1)[0]
        if any(c < 0x20 or c > 0x7E for c in text):
            raise ArchiveError()
    name = block[0:100].split(b"\0", 1)[0]
    prefix_end = 476 if block[508:512] == b"tar\0" else 500  # Go reads star's prefix shorter
    prefix = block[345:prefix_end].split(b"\0", 1)[0] if block[257:263] == b"ustar\0" else b""
    if prefix:
        name = prefix + b"/" + name
    kind = block[156:157]
    linkname = block[157:257].split(b"\0", 1)[0]
    return _Member(
        name=_text(name),
        size=_octal(block[124:136]),
        kind=kind,
        linkname=_text(linkname),
    )


def _parse_pax(data: bytes) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            raise ArchiveError()
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ArchiveError() from None
        if length <= 0 or pos + length > len(data) or data[pos + length - 1] != 0x0A:
            raise ArchiveError()
        record = data[space + 1 : pos + length - 1]
        key, sep, value = record.partition(b"=")
        if not sep or key.startswith(b"GNU.sparse."):  # Go would expand a sparse file, renamed
            raise ArchiveError()
        records[_text(key)] = _text(value)
        pos += length
    return records


# What the Engine's loader (moby's DetectCompression) and containerd's import decompress
# before reading the tar: a plaintext starting like this would be read as a different
# archive from the one checked here, so it is refused whatever else it is.
_COMPRESSION_MAGIC = (b"BZh", b"\x1f\x8b\x08", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")


def looks_compressed(head: bytes) -> bool:
    """``head`` starts like a bzip2, gzip, xz or zstd stream (or a zstd skippable frame)."""
    return head.startswith(_COMPRESSION_MAGIC) or (head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50)


@dataclass
class TarReader:
    """Feed the tar with :meth:`feed`; :meth:`close` checks it ended well. Then ``kinds`` (every
    member name: its type flag), ``digests`` (every regular file: the hex SHA-256 of its
    content), ``kept`` (regular files ≤ ``MAX_META_FILE``: their content) and :meth:`resolve`
    say what the Engine would unpack."""

    _buf: bytearray = field(default_factory=bytearray)
    _member: _Member | None = None
    _remaining: int = 0
    _padding: int = 0
    _hasher: _Hasher | None = None
    _keep: bytearray | None = None
    _ext: bytearray | None = None  # content of a pax or GNU long-name record being read
    _pax: dict[str, str] = field(default_factory=dict)  # the next member's overrides: pax,
    _gnu: dict[str, str] = field(default_factory=dict)  # then GNU long name / link target
    _ended: bool = False
    _entries: int = 0
    kinds: dict[str, bytes] = field(default_factory=dict)  # every member name: its type
    digests: dict[str, str] = field(default_factory=dict)  # complete once close() returns
    _links: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name: (type, target)
    kept: dict[str, bytes] = field(default_factory=dict)
    _meta_total: int = 0

    def feed(self, data: bytes) -> None:
        try:
            self._feed(data)
        except BaseException:
            self.abort()
            raise

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._remaining or self._padding:
                view = self._consume_body(view)
                continue
            need = BLOCK - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == BLOCK:
                block = bytes(self._buf)
                self._buf.clear()
                self._on_block(block)

    def _on_block(self, block: bytes) -> None:
        if not self._entries and not self._ended and looks_compressed(block):
            raise ArchiveError()  # the Engine would decompress it and load another archive
        if self._ended:
            if block.count(0) != BLOCK:  # only zero padding may follow the end marker
                raise ArchiveError()
            return
        if block.count(0) == BLOCK:
            self._ended = True
            return
        self._entries += 1
        if self._entries > MAX_ENTRIES:
            raise ArchiveError()
        member = _parse_header(block)
        if member.kind in _EXT:
            if member.size > MAX_EXT_HEADER:
                raise ArchiveError()
            self._ext = bytearray()
            self._start(member, hashed=False, keep=False)
            return
        # As Go applies them: the last pax header's records, then a non-empty GNU long name.
        pax, gnu, self._pax, self._gnu = self._pax, self._gnu, {}, {}
        member.name = gnu.get("path") or pax.get("path", member.name)
        member.linkname = gnu.get("linkpath") or pax.get("linkpath", member.linkname)
        try:
            member.size = int(pax.get("size", member.size))
        except ValueError:
            raise ArchiveError() from None
        if member.kind == b"\0" and member.name.endswith("/"):
            member.kind = b"5"  # an old-style directory, as Go reads it
        for text in (member.name, member.linkname):
            if "\0" in text or len(text.encode("utf-8", "surrogateescape")) > MAX_NAME:
                raise ArchiveError()
        member.name = norm_name(member.name)
        # A second copy would replace the one checked; Go reads a header-only type's data as headers.
        if member.name in self.kinds or (member.kind in _HEADER_ONLY and member.size):
            raise ArchiveError()
        self.kinds[member.name] = member.kind
        self._charge(len(member.name) + len(member.linkname))
        if member.kind in (b"1", b"2"):
            self._links[member.name] = (member.kind, _link_target(member))
            self._start(member, hashed=False, keep=False)
        elif member.kind in _REGULAR:
            self._start(member, hashed=True, keep=member.size <= MAX_META_FILE)
        elif member.kind in _HEADER_ONLY:
            self._start(member, hashed=False, keep=False)
        else:
            raise ArchiveError()

    def _charge(self, size: int) -> None:
        self._meta_total += size
        if self._meta_total > MAX_META_TOTAL:
            raise ArchiveError()

    def _start(self, member: _Member, *, hashed: bool, keep: bool) -> None:
        if member.size < 0:
            raise ArchiveError()
        self._member = member
        self._remaining = member.size
        self._padding = (-member.size) % BLOCK
        self._hasher = hashlib.sha256() if hashed else None
        if keep:
            self._charge(member.size)
        self._keep = bytearray() if keep else None
        if not member.size:
            self._finish()

    def _consume_body(self, view: memoryview) -> memoryview:
        if self._remaining:
            take = view[: self._remaining]
            self._remaining -= len(take)
            if self._hasher is not None:
                self._hasher.update(take)
            if self._keep is not None:
                self._keep += take
            if self._ext is not None:
                self._ext += take
            view = view[len(take) :]
            if not self._remaining:
                self._finish()
            return view
        skip = min(self._padding, len(view))
        if view[:skip].tobytes().count(0) != skip:  # Go's and GNU tar pad with zeros
            raise ArchiveError()
        self._padding -= skip
        return view[skip:]

    def _finish(self) -> None:
        member = self._member
        assert member is not None
        if self._ext is not None:
            data = bytes(self._ext)
            self._ext = None
            if member.kind == b"x":  # replaces an earlier pax header's records, as in Go
                self._pax = {k: v for k, v in _parse_pax(data).items() if k in _PAX_KEYS}
            elif member.kind == b"g":  # ignored by the Engine, and it ends pending overrides
                self._pax, self._gnu = {}, {}
            else:
                key = "path" if member.kind == b"L" else "linkpath"
                self._gnu[key] = _text(data.split(b"\0", 1)[0])
        elif self._hasher is not None:
            self.digests[member.name] = self._hasher.hexdigest()
            if self._keep is not None:
                self.kept[member.name] = bytes(self._keep)
        self._hasher = None
        self._keep = None
        self._member = None

    def resolve(self, name: str) -> str:
        """The member ``name`` (a path in the archive) reads once links are followed."""
        name = norm_name(name)
        for _ in range(16):  # bounded: a link loop is a broken archive
            if name not in self._links:
                return name
            kind, name = self._links[name]
            if kind == b"1" and name in self._links:  # a hard link to a link is read elsewhere
                raise ArchiveError()
        raise ArchiveError()

    def abort(self) -> None:
        """Give up on this archive (after a failure). Nothing to release: hashing is inline."""

    def close(self) -> None:
        """Raise unless the tar ended properly and nothing lies below a non-directory; then every
        digest is in."""
        if not self._ended or self._remaining or self._buf or self._member is not None:
            raise ArchiveError()
        # Nothing may lie below a non-directory: the Engine would write it through a symlink,
        # somewhere else than its name says (or replace or refuse it).
        ordered = sorted(self.kinds, key=lambda name: name.replace("/", "\0"))
        for name, after in itertools.pairwise(ordered):
            if self.kinds[name] != b"5" and after.startswith(name + "/"):
                raise ArchiveError()


def _link_target(member: _Member) -> str:
    """A link's target from the archive root. The Engine follows a symlink a component at a
    time, so a '..' after a name could climb out of another symlink: only leading ones are
    allowed (docker save's are ``../<id>/layer.tar``)."""
    if member.kind == b"1":
        return norm_name(member.linkname)
    names = [part for part in member.linkname.split("/") if part not in ("", ".")]
    climbs = next((i for i, part in enumerate(names) if part != ".."), len(names))
    if ".." in names[climbs:]:
        raise ArchiveError()
    return norm_name(posixpath.join(posixpath.dirname(member.name), member.linkname))
