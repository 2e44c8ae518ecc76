"""Adapter: the archive key sealed to this node's TPM, around another key source (issue 23).

:class:`SealedKeySource` wraps the key source a spec names (the resource API) and changes only
where the key comes from:

* If a blob sealed for this archive is kept (:class:`SealedKeyStore`), the key is unsealed
  from the TPM (:mod:`imageunlock.engine.keys.tpm`): no login, no network.
* If there is none, or the TPM refuses it (another archive, another TPM or a cleared one, a
  PCR changed, a damaged blob) or cannot be reached, the wrapped source is asked as before.
  When that fails too, its error says both why the sealed key was not used and why the API
  was not (the node then waits for the API, with that reason).
* A key the wrapped source gave is sealed at once (the key stays in memory only; the blob is
  held) and the blob is written only by :meth:`SealedKeySource.keep`, which the caller calls
  after the unlock was verified: a key that decrypted nothing is never kept. A failure to seal
  costs the next unlock its offline path, never this unlock.

The key is never written unsealed: the store holds blobs only (one file per archive path,
scope and key source, mode 0600 in a 0700 directory). The blob is bound to the archive's
*identity* (:func:`archive_identity`): the scope (the ImageUnlock's namespace), the key source
(member, URL, Secret name), the archive's path and the file itself (inode, size, mtime; its
SHA-256 when the spec names one), so a new archive at the same path falls back to the API and
reseals, and one tenant's blob never unlocks another tenant's request.

The wrapped source is still opened (its Secret read) first: deleting the credentials still
stops a node from unlocking, offline or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imageunlock.engine import archive
from imageunlock.engine.keys import DEFAULT_TCTI
from imageunlock.engine.models import KeySession, KeySource, Phase, Say
from imageunlock.engine.statefiles import read_state_file
from imageunlock.errors import KeySealError, UnlockError, UnsealRefusedError

log = logging.getLogger(__name__)

SEALED_DIR = "sealed-keys"
SUFFIX = ".tpmseal"
MAX_BLOB_BYTES = 256 * 1024


@dataclass(frozen=True)
class Sealing:
    """How keys are sealed on this node: the TPM's TCTI string and the PCRs to bind to."""

    tcti: str = DEFAULT_TCTI
    pcrs: tuple[int, ...] = ()


def archive_identity(
    scope: str, source: str, path: str, roots: Sequence[str] = (), sha256: str | None = None
) -> str | None:
    """What a sealed key is bound to (see the module's docstring), or None when the archive
    cannot be looked at (the unlock then says why; nothing is sealed for it)."""
    found = archive.signature(path, roots)
    if not found or found[0] == "unavailable":
        return None
    _dev, inode, size, mtime_ns = found[0], found[1], found[2], found[3]
    return json.dumps(
        {
            "scope": scope,
            "source": source,
            "path": os.path.normpath(path),
            "file": [inode, size, mtime_ns],
            "sha256": sha256.lower() if sha256 else None,
        },
        separators=(",", ":"),
        sort_keys=True,
    )


class SealedKeyStore:
    """Sealed blobs under ``directory`` (created 0700): one file per scope, key source and
    archive path, so a new archive at the path replaces the blob of the old one."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def path_for(self, identity: str) -> str:
        where = json.loads(identity)
        slot = json.dumps([where["scope"], where["source"], where["path"]], separators=(",", ":"))
        return os.path.join(self.directory, hashlib.sha256(slot.encode()).hexdigest()[:40] + SUFFIX)

    def load(self, identity: str) -> bytes | None:
        # Not followed through a symlink, never blocked on a FIFO, only a 0600 file of ours.
        blob = read_state_file(self.path_for(identity), "sealed key")
        return blob if blob is not None and len(blob) <= MAX_BLOB_BYTES else None

    def save(self, identity: str, blob: bytes) -> None:
        """Atomically: a fresh 0600 file in the 0700 directory, fsync, rename."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.directory, 0o700)
        target = self.path_for(identity)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".sealing-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _tpm() -> Any:
    """The TPM adapter (tpm.py), imported when a sealed key source is built, as the registries
    import adapters: what orchestrates this wrapper needs no import of the adapter itself."""
    return importlib.import_module("imageunlock.engine.keys.tpm")


Seal = Callable[..., bytes]
Unseal = Callable[..., bytes]


class SealedKeySource:
    """A :class:`KeySource` that tries the key sealed to this node's TPM before ``inner``."""

    def __init__(
        self,
        inner: KeySource,
        store: SealedKeyStore,
        identity: str | None,
        sealing: Sealing,
        *,
        seal: Seal | None = None,
        unseal: Unseal | None = None,
    ) -> None:
        self.inner = inner
        self.store = store
        self.identity = identity
        self.sealing = sealing
        tpm = _tpm()
        self._seal: Seal = seal or tpm.seal
        self._unseal: Unseal = unseal or tpm.unseal
        self._blob_info: Callable[[bytes], Any] = tpm.blob_info
        self._pending: bytes | None = None  # a blob of a key the wrapped source gave
        self.unsealed = False  # the last session's key came from the TPM

    def __repr__(self) -> str:
        return f"SealedKeySource({self.inner!r}, tcti={self.sealing.tcti!r}, pcrs={list(self.sealing.pcrs)})"

    def open(self) -> KeySession:
        self._pending = None
        self.unsealed = False
        return _SealedSession(self, self.inner.open())

    def keep(self) -> bool:
        """Write the blob of this unlock's key (call after the unlock was verified). True when
        one was written; a failure to write is logged, never raised (the images are fine)."""
        blob, self._pending = self._pending, None
        if blob is None or self.identity is None:
            return False
        try:
            self.store.save(self.identity, blob)
        except OSError as exc:
            log.warning("could not keep the sealed key in %s: %s", self.store.directory, exc.strerror or exc)
            return False
        log.info("the archive's key is sealed to this node's TPM (%s)", self.store.directory)
        return True

    def failed(self, error: UnlockError) -> bool:
        """The unlock failed: if its key came from the TPM and the failure is not transient
        (the archive did not decrypt or verify with it: a file rewritten in place with its
        inode, size and mtime kept), drop the blob so the next attempt asks the key source.
        True when one was dropped."""
        self._pending = None
        if not self.unsealed or error.transient or self.identity is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.store.path_for(self.identity))
        log.warning("the key sealed to this node's TPM did not unlock the archive (%s): dropped", error.reason)
        return True

    def sealed_blob(self, key: bytes) -> None:
        if self.identity is None:
            return
        try:
            self._pending = self._seal(key, tcti=self.sealing.tcti, pcrs=self.sealing.pcrs, identity=self.identity)
        except UnlockError as exc:  # the TPM is away or refuses: this unlock goes on
            log.warning("could not seal the archive's key to the TPM (%s): %s", exc.reason, exc.message)


class _SealedSession:
    def __init__(self, owner: SealedKeySource, inner: KeySession) -> None:
        self.owner = owner
        self.inner = inner
        self.blob: bytes | None = None
        self.refused: KeySealError | None = None  # why the kept blob was not used
        self.authenticated = False

    def __repr__(self) -> str:
        return "_SealedSession()"

    def authenticate(self, say: Say) -> None:
        identity = self.owner.identity
        blob = self.owner.store.load(identity) if identity is not None else None
        if blob is not None:
            try:
                info = self.owner._blob_info(blob)
            except UnsealRefusedError as exc:
                self.refused = exc
            else:
                if info.identity == identity:
                    self.blob = blob
                    say(Phase.AUTHENTICATING, "using the key sealed to this node's TPM (no login)")
                    return
                self.refused = UnsealRefusedError("OtherArchive", "the sealed key is for an earlier archive")
        self._login(say)

    def _login(self, say: Say) -> None:
        try:
            self.inner.authenticate(say)
        except UnlockError as exc:
            raise self._explained(exc) from None
        self.authenticated = True

    def get_key(self, say: Say) -> bytes:
        if self.blob is not None:
            say(Phase.FETCHING_KEY, "unsealing the key from this node's TPM")
            try:
                key = self.owner._unseal(self.blob, tcti=self.owner.sealing.tcti, identity=self.owner.identity)
            except KeySealError as exc:
                cause = getattr(exc, "cause", exc.reason)
                log.warning("the sealed key was not used (%s): %s; asking the key source", cause, exc.message)
                self.refused = exc
            else:
                self.owner.unsealed = True
                log.info("the archive's key was unsealed from this node's TPM (no resource API)")
                return key
            self.blob = None
        if not self.authenticated:
            self._login(say)
        try:
            key = self.inner.get_key(say)
        except UnlockError as exc:
            raise self._explained(exc) from None
        self.owner.sealed_blob(key)
        return key

    def _explained(self, exc: UnlockError) -> UnlockError:
        """``exc``, its message prefixed with why the sealed key was not used, if it was not."""
        if self.refused is None:
            return exc
        cause = getattr(self.refused, "cause", self.refused.reason)
        exc.message = f"the key sealed to this node's TPM was not used ({cause}: {self.refused.message}); {exc.message}"
        exc.args = (exc.message,)
        return exc

    def close(self) -> None:
        self.inner.close()
