"""Streaming check of an image archive (the tar ``docker save`` writes) as it passes by.

AES-CBC has no integrity: a flipped ciphertext byte garbles one block and keeps the padding
valid, so a corrupted archive can decrypt "successfully". The image tar carries its own
content addresses, though, and this module checks them *in the stream* while the bytes go
on to the runtime:

* every ``blobs/sha256/<hex>`` file (OCI layout) hashes to its name;
* every image config hashes to the name ``manifest.json`` gives it (legacy ``<hex>.json``
  or OCI ``blobs/sha256/<hex>``) — that digest is also the image ID the Engine will report;
* every layer named in ``manifest.json`` hashes to its ``rootfs.diff_ids`` entry (or, for a
  compressed OCI blob, to its blob name);
* the files no digest covers (``manifest.json``, ``repositories``, legacy ``<id>/json`` and
  ``VERSION``) are at least well-formed.

The tar itself is read by :class:`~imageunlock.engine.tarstream.TarReader`, as the Engine reads it,
so the ``manifest.json`` checked is the one loaded; the JSON is read as Go's encoding/json
reads it (keys match case-insensitively, a key given twice is refused); and an archive may
tag only the requested refs (:func:`check_refs`), counting every ref some loader would
apply: ``RepoTags``, the legacy ``repositories`` file and ``index.json``'s name annotations.

:func:`verified_stream` holds back the final chunk until all of that is checked, so a bad
archive aborts the upload before its last byte and the Engine (which unpacks the whole body
before loading anything) loads nothing.

Any problem raises :class:`~imageunlock.errors.ArchiveError` — the same single message as a
decryption failure, because with a wrong key the two are indistinguishable anyway.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from imageunlock.engine.refs import describe, normalize_ref, unrequested
from imageunlock.engine.tarstream import BLOCK, TarReader, norm_name
from imageunlock.errors import ArchiveError, ForeignTagsError, ImagesNotInArchiveError

_BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
_LEGACY_CONFIG_RE = re.compile(r"^([0-9a-f]{64})\.json$")
_DIGEST_RE = re.compile(r"^sha256:([0-9a-f]{64})$")
_NAME_ANNOTATIONS = ("io.containerd.image.name", "org.opencontainers.image.ref.name")
CTR_BASE_NAME = "import-YYYY-MM-DD"  # how ctr images import prefixes a bare ref.name (shown as such)


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


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):  # Go keeps the last of a repeated key, or merges the two
        raise ArchiveError()
    return obj


# JSON text that Go's encoding/json (the Engine's) and Python's json read differently: an
# escaped surrogate (Go turns a lone one into U+FFFD, Python keeps it) and U+FFFD itself.
_DIVERGENT_JSON = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\\u[fF][fF][fF][dD]|\xef\xbf\xbd")
_T = TypeVar("_T")


def _field(obj: object, key: str, kind: type[_T]) -> _T | None:
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


@dataclass
class ImageTarVerifier:
    """Feed plaintext with :meth:`feed`; :meth:`close` checks everything and says what loaded."""

    tar: TarReader = field(default_factory=TarReader)
    contents: ArchiveContents | None = None  # set by close() once everything checked out

    def feed(self, data: bytes) -> None:
        self.tar.feed(data)

    def abort(self) -> None:
        """Give up on this archive (after a failure); nothing is left running."""
        self.tar.abort()

    # -- the checks, once every byte has been seen ------------------------------------

    def _digest(self, name: str) -> str:
        resolved = self.tar.resolve(name)
        if resolved not in self.tar.digests:
            raise ArchiveError()
        return self.tar.digests[resolved]

    def _json(self, name: str) -> object:
        resolved = self.tar.resolve(name)
        if resolved not in self.tar.kept:
            raise ArchiveError()
        raw = self.tar.kept[resolved]
        if _DIVERGENT_JSON.search(raw):
            raise ArchiveError()
        try:
            return json.loads(raw, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):  # RecursionError: '[[[[…' nested too deep
            raise ArchiveError() from None

    def close(self) -> ArchiveContents:
        self.tar.close()
        for name, digest in self.tar.digests.items():
            blob = _BLOB_RE.match(name)
            if blob and blob.group(1) != digest:
                raise ArchiveError()
        manifest = self._json("manifest.json")
        if not isinstance(manifest, list) or not manifest:
            raise ArchiveError()
        images: dict[str, str] = {}
        addressed: set[str] = set()
        configs: set[str] = set()
        for entry in manifest:
            image_id, tags = self._check_entry(entry, addressed)
            configs.add(image_id)
            for tag in tags:  # a later entry moves the tag, as in docker load
                images.pop(tag, None)
                images[tag] = image_id
        self._check_unaddressed(addressed)
        contents = ArchiveContents(images=images, tags=(*images, *self._other_tags()))
        self._check_index(contents, configs)
        self.contents = contents
        return contents

    def _check_index(self, contents: ArchiveContents, configs: set[str]) -> None:
        """containerd imports an OCI-layout archive from ``index.json`` alone, never reading
        ``manifest.json``: every manifest the index names must be a blob of this archive
        (never content already in the runtime's store), whose config is one ``manifest.json``
        names and the checks verified — the one ``manifest.json`` gives its name — and whose
        layers are blobs of this archive. So what ctr loads is what was checked."""
        index = self._json_if_present("index.json")
        for descriptor in (_field(index, "manifests", list) if index is not None else None) or []:
            annotations = _field(descriptor, "annotations", dict) or {}
            # Every full name either annotation gives (a loader tags with one or the other)
            # must name, in manifest.json, the image this descriptor's manifest is.
            names = [annotations.get(key) for key in _NAME_ANNOTATIONS]
            wanted = {
                found
                for n, name in enumerate(names)
                if isinstance(name, str) and name and (n == 0 or ":" in name or "/" in name)
                if (found := contents.image_id(name)) is not None
            }
            for config in self._manifest_configs(_field(descriptor, "digest", str), depth=0):
                if config not in configs or any(config != want for want in wanted):
                    raise ArchiveError()

    def _manifest_configs(self, digest: str | None, depth: int) -> list[str]:
        """The config digests of the manifest (or, one level down, the index) a descriptor
        names, each checked to be a blob of this archive along with its layers."""
        blob = self._blob(digest)
        document = self._json(blob)
        children = _field(document, "manifests", list)
        if children is not None:  # an image index (several platforms)
            if depth:
                raise ArchiveError()
            return [c for child in children for c in self._manifest_configs(_field(child, "digest", str), depth + 1)]
        config = _field(_field(document, "config", dict), "digest", str)
        self._blob(config)
        for layer in _field(document, "layers", list) or []:
            self._blob(_field(layer, "digest", str))
        return [str(config)]

    def _blob(self, digest: str | None) -> str:
        """The member that holds the blob ``digest`` names; it must be in this archive."""
        found = _DIGEST_RE.match(digest or "")
        name = f"blobs/sha256/{found.group(1)}" if found else ""
        if not found or self.tar.resolve(name) not in self.tar.digests:
            raise ArchiveError()
        return name

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
                elif name and not annotations.get(_NAME_ANNOTATIONS[0]):
                    # A bare tag with no full name beside it: ctr names the image
                    # ``import-<date>:<tag>`` (its default --base-name): never a requested ref.
                    tags.append(f"{CTR_BASE_NAME}:{name}")
        return tags

    def _json_if_present(self, name: str) -> object:
        return self._json(name) if self.tar.resolve(name) in self.tar.digests else None

    def _check_unaddressed(self, addressed: set[str]) -> None:
        """Files no digest covers (manifest.json, repositories, legacy ``<id>/json`` and
        ``VERSION``) must at least be well-formed, so a garbled block there is caught too."""
        for name in self.tar.digests:
            if name in addressed or _BLOB_RE.match(name):
                continue
            if posixpath.basename(name) == "VERSION":
                if self.tar.kept.get(name, b"").strip() != b"1.0":
                    raise ArchiveError()
                continue
            self._json(name)  # raises unless kept and valid JSON

    def _check_entry(self, entry: object, addressed: set[str]) -> tuple[str, list[str]]:
        config_name = _field(entry, "Config", str)
        layers = _field(entry, "Layers", list) or []
        tags = _field(entry, "RepoTags", list) or []
        if config_name is None or not all(isinstance(tag, str) for tag in tags):
            raise ArchiveError()
        named = _LEGACY_CONFIG_RE.match(posixpath.basename(config_name)) or _BLOB_RE.match(norm_name(config_name))
        config_digest = self._digest(config_name)
        if named is None or named.group(1) != config_digest:
            raise ArchiveError()
        addressed.add(self.tar.resolve(config_name))
        diff_ids = _field(_field(self._json(config_name), "rootfs", dict), "diff_ids", list)
        if diff_ids is None or len(diff_ids) != len(layers):
            raise ArchiveError()
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            if not isinstance(layer, str) or not isinstance(diff_id, str):
                raise ArchiveError()
            digest = self._digest(layer)
            addressed.add(self.tar.resolve(layer))
            blob = _BLOB_RE.match(self.tar.resolve(layer))
            if diff_id != f"sha256:{digest}" and not (blob and blob.group(1) == digest):
                raise ArchiveError()
        return f"sha256:{config_digest}", tags


def verified_stream(
    chunks: Iterable[bytes],
    verifier: ImageTarVerifier,
    expected: Iterable[str] = (),
    before_tail: Callable[[], None] | None = None,
) -> Iterator[bytes]:
    """Pass ``chunks`` through ``verifier``, holding the tail back until it all checks out.

    Held back: the last chunk (never shorter than the end-of-archive marker, two zero
    blocks) and every trailing run of zero bytes (as a count, not in memory) until non-zero
    data follows. The checks refuse anything but zero blocks after an end marker, so no
    marker ever reaches the consumer before every check passed, however many zero bytes a
    crafted plaintext appends (a loader that stops at the marker — the Docker Engine from 23
    untars in-process and does not drain the body — would otherwise load an archive the
    checks were about to refuse). If anything is wrong — a broken archive, or one that lacks
    an ``expected`` ``name:tag`` or would tag anything else (:func:`check_refs`) — the
    consumer is cut off before it has seen a complete archive, and the generator raises
    instead of yielding the tail.
    """
    expected = list(expected)
    held = b""
    zeros = 0  # trailing zero bytes received, not yet passed on

    def release(data: bytes) -> Iterator[bytes]:
        nonlocal zeros
        if not data:
            return
        body = data if data[-1] else data.rstrip(b"\0")
        if body:
            if zeros:
                yield from _zero_bytes(zeros)
                zeros = 0
            yield body
        zeros += len(data) - len(body)

    try:
        for chunk in chunks:
            verifier.feed(chunk)
            if len(chunk) >= 2 * BLOCK:
                yield from release(held)
                held = chunk
            else:
                held += chunk
    finally:
        verifier.abort()  # also on an exception or an abandoned generator
    check_refs(verifier.close(), expected)
    if before_tail is not None:
        before_tail()  # a last check of the caller's (the archive's digest)
    yield from release(held)
    yield from _zero_bytes(zeros)


_ZEROS = bytes(64 * 1024)


def _zero_bytes(count: int) -> Iterator[bytes]:
    while count:
        n = min(count, len(_ZEROS))
        yield _ZEROS[:n]
        count -= n


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
