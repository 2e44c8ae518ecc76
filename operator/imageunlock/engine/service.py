"""The unlock workflow: fast path, authenticate, fetch key, stream-decrypt into the runtime, verify.

Framework-free: the CLI and the kopf handlers both drive :meth:`UnlockService.unlock`, and
learn what happens through a ``report(phase, message, done, total)`` callback. The service
knows two ports only: a runtime and a key source (engine/models.py).
"""

from __future__ import annotations

import logging
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import BinaryIO

from imageunlock.engine.archive import (
    HashingReader,
    check_path,
    check_sha256,
    identity,
    lock_archive,
    open_archive,
    signature,
)
from imageunlock.engine.crypto import CHUNK_SIZE, decrypt_with_key
from imageunlock.engine.dockersave import ImageTarVerifier, verified_stream
from imageunlock.engine.models import KeySession, KeySource, Phase, Report, Runtime, UnlockRequest, UnlockResult
from imageunlock.errors import ArchiveNotFoundError, ImagesNotVerifiedError, InsufficientStorageError

log = logging.getLogger(__name__)


def _noop(phase: Phase, message: str, done: int, total: int) -> None:
    return None


class VerifiedArchives:
    """What this node verified itself: for an archive file (its path and identity: device,
    inode, size, mtime, ctime, links), the image IDs an unlock of it loaded and verified, and
    its SHA-256 when that was checked. Another request naming the very same file may take
    those IDs as known (no key request): they are what that file holds. Never IDs the node
    did not verify, never for a file that changed since (its identity changes with it), and
    only within one scope (the operator's: the namespace): a tenant with no credentials must
    not be made Ready, nor hold refs, on the strength of another tenant's unlock."""

    LIMIT = 256

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, str, tuple[object, ...]], tuple[str | None, dict[str, str]]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def remember(
        self, scope: str, path: str, identity: tuple[object, ...], digest: str | None, ids: Mapping[str, str]
    ) -> None:
        key = (scope, posixpath.normpath(path), identity)
        with self._lock:
            checked, known = self._entries.pop(key, (None, {}))
            self._entries[key] = (digest.lower() if digest else checked, {**known, **ids})
            while len(self._entries) > self.LIMIT:
                self._entries.popitem(last=False)

    def known(self, scope: str, path: str, identity: tuple[object, ...], digest: str | None) -> dict[str, str]:
        """IDs verified from this very file in this scope; none when the request names a
        digest the node did not check it against."""
        with self._lock:
            found = self._entries.get((scope, posixpath.normpath(path), identity))
        if found is None or (digest and found[0] != digest.lower()):
            return {}
        return dict(found[1])


class UnlockService:
    def __init__(
        self,
        runtime: Runtime,
        keys: KeySource,
        *,
        archive_roots: Sequence[str] = (),
        lock_timeout: float = 0.0,
        chunk_size: int = CHUNK_SIZE,
        verified: VerifiedArchives | None = None,
        scope: str = "",
        may_start: Callable[[], None] = lambda: None,
    ) -> None:
        self.runtime = runtime
        self.keys = keys
        self.archive_roots = tuple(archive_roots)
        self.lock_timeout = lock_timeout
        self.chunk_size = chunk_size
        self.verified = verified
        self.scope = scope  # whose verifications count (the operator's: the namespace)
        # Raises when this node must not start an import now (the agent: DiskPressure);
        # asked after the fast paths, before any login: images already there stay Ready.
        self.may_start = may_start

    def _node_known(self, request: UnlockRequest, identity: tuple[object, ...]) -> UnlockRequest | None:
        """``request`` with the IDs this node verified from the file of that identity added,
        if that adds any; else None."""
        if self.verified is None:
            return None
        known = self.verified.known(self.scope, request.archive_path, identity, request.archive_sha256)
        merged = {**request.known_ids, **known}  # the node's own verification wins over a status
        return replace(request, known_ids=merged) if merged != dict(request.known_ids) else None

    def present(self, request: UnlockRequest) -> dict[str, str] | None:
        """All requested images with their IDs, if each holds the ID an earlier unlock
        verified (``request.known_ids``); else None. Without a known ID for every ref there
        is no fast path: whatever holds a tag is not vouched for until an unlock has
        compared it with the archive (an impostor planted at ``NAME:VERSION`` is replaced)."""
        if any(not request.known_ids.get(ref) for ref in request.refs):
            return None
        ids = self.runtime.image_ids(request.refs)
        if any(ids[ref] != request.known_ids[ref] for ref in request.refs):
            return None
        return {ref: request.known_ids[ref] for ref in request.refs}

    def unlock(self, request: UnlockRequest, report: Report = _noop) -> UnlockResult:
        """The order is the point. Nothing costly happens before the key source is opened
        (its Secret read: a missing Secret stalls at once); of the archive, only whether the
        path names a regular file under the roots is learnt before the key source accepted
        the credentials (authenticate) — not its size, not a progress figure, not a digest
        verdict, not which images a node holds; the archive's SHA-256 is checked without a
        lock (other unlocks go on); the archive lock is held from the key request to the end
        of the load, and the key source's session is closed right after the key request."""
        report(Phase.PENDING, "checking for images already loaded", 0, 0)
        if (ids := self.present(request)) is not None:
            return UnlockResult(images=ids, fast_path=True)
        check_path(request.archive_path, self.archive_roots)  # a path no open accepts reads no Secret
        if self.verified is not None:  # another request had this very file unlocked here
            here = signature(request.archive_path, self.archive_roots)
            if (trusted := self._node_known(request, here)) is not None and (ids := self.present(trusted)):
                return UnlockResult(images=ids, fast_path=True)
        self.may_start()
        session = self.keys.open()
        try:
            with open_archive(request.archive_path, self.archive_roots) as (handle, size):
                return self._unlock_open(request, session, report, handle, size)
        except ArchiveNotFoundError:
            # The operator (roots set) does not say which images a node holds: anyone with a
            # Secret could ask. The command line, run by the archive's owner, says which.
            if self.archive_roots:
                what = "the images are not there as verified"
            else:
                found = self.runtime.image_ids(request.refs)
                absent = [r for r, i in found.items() if i is None]
                unverified = [r for r, i in found.items() if i is not None and request.known_ids.get(r) != i]
                what = (
                    f"images are not loaded ({', '.join(absent)})"
                    if absent
                    else f"images present are not verified ({', '.join(unverified)})"
                )
            raise ArchiveNotFoundError(
                f"archive {request.archive_path!r} does not exist and {what}; "
                "put the archive on the node or correct spec.archivePath"
            ) from None
        finally:
            session.close()

    def _unlock_open(
        self, request: UnlockRequest, session: KeySession, report: Report, handle: BinaryIO, size: int
    ) -> UnlockResult:
        opened = identity(handle)  # before a byte is read: what this unlock verifies
        self.runtime.ping()  # a runtime that is down costs no login and no key request
        session.authenticate(lambda phase, message: report(phase, message, 0, 0))
        if request.archive_sha256:

            def hashed(done: int) -> None:
                report(Phase.PENDING, "checking the archive's SHA-256", done, size)

            hashed(0)
            check_sha256(handle, request.archive_sha256, hashed)
        with lock_archive(handle, request.archive_path, self.lock_timeout):
            # Someone may have loaded the images while we logged in or waited for the
            # lock: another unlock of this very file on this node, say.
            trusted = self._node_known(request, opened) or request
            if (ids := self.present(trusted)) is not None:
                return UnlockResult(images=ids, fast_path=True)
            key = session.get_key(lambda phase, message: report(phase, message, 0, size))
            session.close()  # right after the key request, before the archive is read
            result = self._load(request, report, handle, size, key)
            if self.verified is not None:
                self.verified.remember(self.scope, request.archive_path, opened, request.archive_sha256, result.images)
            return result

    def _load(
        self,
        request: UnlockRequest,
        report: Report,
        handle: BinaryIO,
        size: int,
        key: bytes,
    ) -> UnlockResult:
        def decrypted(done: int) -> None:
            report(Phase.LOADING, "decrypting into the container runtime", done, size)

        decrypted(0)
        verifier = ImageTarVerifier()
        # With archiveSha256, the decrypting pass hashes what it reads and the load's tail is
        # released only if that matches: the file may have been rewritten since the check above.
        digest = request.archive_sha256
        source = HashingReader(handle) if digest else handle
        plaintext = decrypt_with_key(source, key, chunk_size=self.chunk_size, on_progress=decrypted)
        del key
        final_check = (lambda: source.check(digest)) if isinstance(source, HashingReader) and digest else None
        try:
            loaded = self.runtime.load(
                verified_stream(plaintext, verifier, request.refs, final_check), request.refs, request.owner
            )
        except InsufficientStorageError as exc:  # the runtime counted only what it took before failing
            raise exc.for_archive(size) from None
        log.info("runtime loaded %d image(s) from %s", len(loaded), request.archive_path)

        report(Phase.VERIFYING, "verifying loaded images", size, size)
        contents = verifier.contents
        ids = self.runtime.image_ids(request.refs)
        missing = [ref for ref in request.refs if ids[ref] is None]
        wrong = [
            ref
            for ref in request.refs
            if ids[ref] is not None and (contents is None or contents.image_id(ref) != ids[ref])
        ]
        if missing or wrong:
            raise ImagesNotVerifiedError(missing, wrong)
        verified = {ref: ids[ref] or "" for ref in request.refs}
        return UnlockResult(images=verified, fast_path=False, archive_bytes=size)
