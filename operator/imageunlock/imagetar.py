"""Streaming check of an image archive (the tar ``docker save`` writes) as it passes by.

AES-CBC has no integrity: a flipped ciphertext byte garbles one block and keeps the padding
valid, so a corrupted archive can decrypt "successfully". The image tar carries its own
content addresses, though, and this module checks them *in the stream* while the bytes go
on to the runtime:

* every ``blobs/sha256/<hex>`` file (OCI layout) hashes to its name;
* every image config hashes to the name ``manifest.json`` gives it (legacy ``<hex>.json``
  or OCI ``blobs/sha256/<hex>``) — that digest is also the image ID the Engine will report;
* every layer named in ``manifest.json`` hashes to its ``rootfs.diff_ids`` entry (or, for a
  compressed OCI blob, to its blob name).

It reads the tar as the Engine does (Go's archive/tar and encoding/json, moby's untar) and
refuses what those could read otherwise — data after a directory or link header (to Go,
more headers), a name given twice, a member below a link, sparse files, a JSON key given
twice — so the ``manifest.json`` checked is the one loaded; and an archive may tag only the
requested refs (:func:`check_refs`).

:func:`verified_stream` holds back the final chunk until all of that is checked, so a bad
archive aborts the upload before its last byte and the Engine (which unpacks the whole body
before loading anything) loads nothing. Memory and time are bounded: ``MAX_ENTRIES`` headers,
then names and metadata files (each ≤ ``MAX_META_FILE``) up to ``MAX_META_TOTAL`` in all.

Any problem raises :class:`~imageunlock.errors.ArchiveError` — the same single message as a
decryption failure, because with a wrong key the two are indistinguishable anyway.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import queue
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .errors import ArchiveError, ForeignTagsError, ImagesNotInArchiveError
from .refs import describe, normalize_ref, unrequested

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
_BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_LEGACY_CONFIG_RE = re.compile(r"^([0-9a-f]{64})\.json$")
_REGULAR = (b"0", b"\0", b"7")
_HEADER_ONLY = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, dirs, fifos: Go reads no data
_EXT = (b"x", b"g", b"L", b"K")  # pax (next member, global), GNU long name / link target
_PAX_KEYS = ("path", "linkpath", "size")
_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")


@dataclass(frozen=True)
class ArchiveContents:
    """``images``: each manifest.json ``RepoTags`` ref, as spelled there, to ``sha256:<config
    digest>`` (a later entry moves a tag, as in ``docker load``); ``tags``: every ref some
    loader could apply — those plus the ``repositories`` and ``index.json`` names."""

    images: dict[str, str]
    tags: tuple[str, ...] = ()

    def image_id(self, ref: str) -> str | None:
        """The config digest ``ref`` will name once loaded, however either side spells it."""
        want = normalize_ref(ref)
        found = [digest for tag, digest in self.images.items() if normalize_ref(tag) == want]
        return found[-1] if found else None


@dataclass
class _Member:
    name: str
    size: int
    kind: bytes
    linkname: str = ""


def _norm(name: str) -> str:
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
        name=name.decode("utf-8", "surrogateescape"),
        size=_octal(block[124:136]),
        kind=kind,
        linkname=linkname.decode("utf-8", "surrogateescape"),
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
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # Go keeps the last of a repeated key, or merges the two
        raise ArchiveError()
    return obj


def _field(obj: object, key: str, kind: type) -> object:
    """``obj[key]`` as Go's encoding/json (the Engine's, containerd's) fills a struct field:
    keys match case-insensitively, so ``repotags`` counts and two spellings are refused.
    ``None`` when absent or null, else it must be a ``kind``."""
    if not isinstance(obj, dict):
        raise ArchiveError()
    found = [value for name, value in obj.items() if name.casefold() == key.casefold()]
    value = found[0] if len(found) == 1 else None
    if len(found) > 1 or not isinstance(value, (kind, type(None))):
        raise ArchiveError()
    return value


class _HashWorker:
    """Hashes file contents on a second thread, so SHA-256 (the costliest step, and one that
    releases the GIL) overlaps decryption, parsing and the upload. The queue is bounded, so
    at most ``depth`` chunks (≤ 64 KiB each) wait in memory."""

    def __init__(self, depth: int = 64) -> None:
        self._queue: queue.Queue[tuple[object, object] | None] = queue.Queue(maxsize=depth)
        self._thread: threading.Thread | None = None

    def _put(self, item: tuple[object, object]) -> None:
        if self._thread is None:  # started on first use: a verifier that never sees data costs nothing
            self._thread = threading.Thread(target=self._run, name="imagetar-sha256", daemon=True)
            self._thread.start()
        self._queue.put(item)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            target, data = item
            if target is None:
                data()  # type: ignore[operator]
            else:
                target.update(data)  # type: ignore[attr-defined]

    def update(self, hasher: object, data: memoryview) -> None:
        self._put((hasher, data))

    def then(self, callback: object) -> None:
        """Run ``callback`` once everything queued before it is hashed."""
        self._put((None, callback))

    def join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()


@dataclass
class ImageTarVerifier:
    """Feed plaintext with :meth:`feed`; :meth:`close` checks everything and says what loaded."""

    _buf: bytearray = field(default_factory=bytearray)
    _member: _Member | None = None
    _remaining: int = 0
    _padding: int = 0
    _hasher: object | None = None
    _keep: bytearray | None = None
    _ext: bytearray | None = None  # content of a pax or GNU long-name record being read
    _pax: dict[str, str] = field(default_factory=dict)  # the next member's overrides: pax,
    _gnu: dict[str, str] = field(default_factory=dict)  # then GNU long name / link target
    _ended: bool = False
    _entries: int = 0
    _kinds: dict[str, bytes] = field(default_factory=dict)  # every member name: its type
    _digests: dict[str, str] = field(default_factory=dict)
    _links: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name: (type, target)
    _meta: dict[str, bytes] = field(default_factory=dict)
    _meta_total: int = 0
    contents: ArchiveContents | None = None  # set by close() once everything checked out
    _worker: _HashWorker = field(default_factory=_HashWorker)

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
        member.name = _norm(member.name)
        # A second copy would replace the one checked; Go reads a header-only type's data as headers.
        if member.name in self._kinds or (member.kind in _HEADER_ONLY and member.size):
            raise ArchiveError()
        self._kinds[member.name] = member.kind
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
                self._worker.update(self._hasher, take)
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
                self._gnu[key] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif self._hasher is not None:
            hasher, name = self._hasher, member.name
            self._worker.then(lambda: self._digests.__setitem__(name, hasher.hexdigest()))  # type: ignore[attr-defined]
            if self._keep is not None:
                self._meta[member.name] = bytes(self._keep)
        self._hasher = None
        self._keep = None
        self._member = None

    # -- the checks, once every byte has been seen ------------------------------------

    def _resolve(self, name: str) -> str:
        name = _norm(name)
        for _ in range(16):  # bounded: a link loop is a broken archive
            if name not in self._links:
                return name
            kind, name = self._links[name]
            if kind == b"1" and name in self._links:  # a hard link to a link is read elsewhere
                raise ArchiveError()
        raise ArchiveError()

    def _digest(self, name: str) -> str:
        resolved = self._resolve(name)
        if resolved not in self._digests:
            raise ArchiveError()
        return self._digests[resolved]

    def _json(self, name: str) -> object:
        resolved = self._resolve(name)
        if resolved not in self._meta:
            raise ArchiveError()
        try:
            return json.loads(self._meta[resolved], object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):  # RecursionError: '[[[[…' nested too deep
            raise ArchiveError() from None

    def abort(self) -> None:
        """Stop the hashing thread (after a failure; ``close`` does it on success)."""
        self._worker.join()

    def close(self) -> ArchiveContents:
        self._worker.join()  # every digest is in once the worker has drained its queue
        if not self._ended or self._remaining or self._buf or self._member is not None:
            raise ArchiveError()
        # Nothing may lie below a non-directory: the Engine would write it through a symlink,
        # somewhere else than its name says (or replace or refuse it).
        ordered = sorted(self._kinds, key=lambda name: name.replace("/", "\0"))
        for name, after in zip(ordered, ordered[1:]):
            if self._kinds[name] != b"5" and after.startswith(name + "/"):
                raise ArchiveError()
        for name, digest in self._digests.items():
            blob = _BLOB_RE.match(name)
            if blob and blob.group(1) != digest:
                raise ArchiveError()
        manifest = self._json("manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise ArchiveError()
        images: dict[str, str] = {}
        addressed: set[str] = set()
        for entry in manifest:
            image_id, tags = self._check_entry(entry, addressed)
            for tag in tags:  # a later entry moves the tag, as in docker load
                images.pop(tag, None)
                images[tag] = image_id
        self._check_unaddressed(addressed)
        self.contents = ArchiveContents(images=images, tags=(*images, *self._other_tags()))
        return self.contents

    def _other_tags(self) -> list[str]:
        """Refs other loaders take: the legacy ``repositories`` file (``{repo: {tag: id}}``) and
        the name annotations of ``index.json`` (containerd); ``org.opencontainers.image.ref.name``
        is a full ref only when it has a ':' or '/' (else a bare tag, relative to a base name)."""
        tags: list[str] = []
        repositories = self._json_if_present("repositories") or {}
        if not isinstance(repositories, dict):
            raise ArchiveError()
        for repo, versions in repositories.items():
            if not isinstance(versions, dict):
                raise ArchiveError()
            tags += (f"{repo}:{tag}" for tag in versions)
        index = self._json_if_present("index.json")
        for descriptor in (_field(index, "manifests", list) if index is not None else None) or []:
            annotations = _field(descriptor, "annotations", dict) or {}
            for key in _NAME_ANNOTATIONS:
                name = annotations.get(key)
                if name is not None and not isinstance(name, str):
                    raise ArchiveError()
                if name and (key == _NAME_ANNOTATIONS[0] or ":" in name or "/" in name):
                    tags.append(name)
        return tags

    def _json_if_present(self, name: str) -> object:
        return self._json(name) if self._resolve(name) in self._digests else None

    def _check_unaddressed(self, addressed: set[str]) -> None:
        """Files no digest covers (manifest.json, repositories, legacy ``<id>/json`` and
        ``VERSION``) must at least be well-formed, so a garbled block there is caught too."""
        for name in self._digests:
            if name in addressed or _BLOB_RE.match(name):
                continue
            if posixpath.basename(name) == "VERSION":
                if self._meta.get(name, b"").strip() != b"1.0":
                    raise ArchiveError()
                continue
            self._json(name)  # raises unless kept and valid JSON

    def _check_entry(self, entry: object, addressed: set[str]) -> tuple[str, list[str]]:
        config_name = _field(entry, "Config", str)
        layers = _field(entry, "Layers", list) or []
        tags = _field(entry, "RepoTags", list) or []
        if config_name is None or not all(isinstance(tag, str) for tag in tags):
            raise ArchiveError()
        named = _LEGACY_CONFIG_RE.match(posixpath.basename(config_name)) or _BLOB_RE.match(
            _norm(config_name)
        )
        config_digest = self._digest(config_name)
        if named is None or named.group(1) != config_digest:
            raise ArchiveError()
        addressed.add(self._resolve(config_name))
        diff_ids = _field(_field(self._json(config_name), "rootfs", dict), "diff_ids", list)
        if diff_ids is None or len(diff_ids) != len(layers):
            raise ArchiveError()
        for layer, diff_id in zip(layers, diff_ids):
            if not isinstance(layer, str) or not isinstance(diff_id, str):
                raise ArchiveError()
            digest = self._digest(layer)
            addressed.add(self._resolve(layer))
            blob = _BLOB_RE.match(self._resolve(layer))
            if diff_id != f"sha256:{digest}" and not (blob and blob.group(1) == digest):
                raise ArchiveError()
        return f"sha256:{config_digest}", tags


def _link_target(member: _Member) -> str:
    """A link's target from the archive root. The Engine follows a symlink a component at a
    time, so a '..' after a name could climb out of another symlink: only leading ones are
    allowed (docker save's are ``../<id>/layer.tar``)."""
    if member.kind == b"1":
        return _norm(member.linkname)
    names = [part for part in member.linkname.split("/") if part not in ("", ".")]
    climbs = next((i for i, part in enumerate(names) if part != ".."), len(names))
    if ".." in names[climbs:]:
        raise ArchiveError()
    return _norm(posixpath.join(posixpath.dirname(member.name), member.linkname))


def verified_stream(
    chunks: Iterable[bytes], verifier: ImageTarVerifier, expected: Iterable[str] = ()
) -> Iterator[bytes]:
    """Pass ``chunks`` through ``verifier``, holding the tail back until it all checks out.

    The held-back tail is never shorter than the tar's end-of-archive marker (two zero
    blocks), so if anything is wrong — a broken archive, or one that lacks an ``expected``
    ``name:tag`` or would tag anything else (:func:`check_refs`) — the consumer (an HTTP
    upload) is cut off before it has seen a complete archive, and the generator raises
    instead of yielding the tail.
    """
    expected = list(expected)
    held = b""
    try:
        for chunk in chunks:
            verifier.feed(chunk)
            if len(chunk) >= 2 * BLOCK:
                if held:
                    yield held
                held = chunk
            else:
                held += chunk
    finally:
        verifier.abort()  # also on an exception or an abandoned generator: no stray thread
    check_refs(verifier.close(), expected)
    if held:
        yield held


def check_refs(contents: ArchiveContents, expected: Iterable[str]) -> None:
    """Raise unless the archive tags every ``expected`` ref and nothing else (refs compared
    as Docker normalises them): ``docker load`` applies every tag it finds, so an archive
    made with the right key could otherwise move ``nginx:latest`` or another team's image."""
    expected = list(expected)
    if missing := [ref for ref in expected if contents.image_id(ref) is None]:
        raise ImagesNotInArchiveError(missing)
    if foreign := unrequested(contents.tags, expected):
        raise ForeignTagsError(
            f"archive would also tag {describe(foreign)}, not requested; nothing was loaded "
            "(an archive may create or move only the requested NAME:VERSION refs: save "
            "exactly those, or check spec.images and spec.version)"
        )
