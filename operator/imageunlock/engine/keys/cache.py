"""An in-memory key cache and the key source that consults it (issue 20, item 3:
``spec.keyCacheSeconds``). Pure but for the clock; a wrapper around any
:class:`~imageunlock.engine.models.KeySource`, so other key-path changes (a TPM seal) wrap or
are wrapped without touching it.

A key is kept only in this process's memory (never on disk, in status, events, logs, metrics
or a repr), under a *binding*: whatever identifies what the key is good for — the caller
puts in the archive file's identity (device, inode, size, mtimes) and the credentials
Secret's resourceVersion, so a new archive file or a changed Secret never gets an old key.
It is dropped ``ttl`` seconds after its last successful use (:meth:`KeyCache.used`), at the
next access or :meth:`KeyCache.purge`; its bytes are overwritten when it is dropped (best
effort: copies handed to a decryption are Python ``bytes``, freed when it ends).

Each entry also carries *tags*: the ImageUnlocks (owners) it served and the Secret its
credentials came from. A revocation drops every entry of a tag at once (:meth:`KeyCache.drop`),
not at the end of the window: the owner deleted or no longer asking for a cache, the Secret
rotated or deleted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from imageunlock.engine.models import KeySession, KeySource, Phase, Say

Binding = Hashable


@dataclass
class _Entry:
    key: bytearray
    last_used: float
    ttl: float
    tags: set[Hashable] = field(default_factory=set)


class KeyCache:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[Binding, _Entry] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<KeyCache of {len(self)} key(s)>"  # never a key or a binding

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, binding: Binding) -> bytes | None:
        """The key kept for ``binding``, if its window since the last successful use is open."""
        self.purge()
        with self._lock:
            entry = self._entries.get(binding)
            return bytes(entry.key) if entry is not None else None

    def used(self, binding: Binding, key: bytes, ttl: float, tags: Iterable[Hashable] = ()) -> None:
        """``key`` just served ``binding`` successfully: keep it ``ttl`` seconds from now,
        droppable by any of ``tags`` (added to those it already has)."""
        if ttl <= 0:
            self.discard(binding)
            return
        with self._lock:
            old = self._entries.get(binding)
            if old is not None and bytes(old.key) == key:
                old.last_used, old.ttl = self.clock(), ttl
                old.tags.update(tags)
                return
            if old is not None:
                _wipe(old.key)
            self._entries[binding] = _Entry(bytearray(key), self.clock(), ttl, set(tags))

    def drop(self, tag: Hashable) -> int:
        """Revoke: drop (and overwrite) every key tagged ``tag``; how many went."""
        with self._lock:
            gone = [b for b, e in self._entries.items() if tag in e.tags]
            entries = [self._entries.pop(b) for b in gone]
        for entry in entries:
            _wipe(entry.key)
        return len(entries)

    def holds(self, tag: Hashable) -> bool:
        """Whether a key tagged ``tag`` is kept (never the key itself)."""
        with self._lock:
            return any(tag in e.tags for e in self._entries.values())

    def discard(self, binding: Binding) -> None:
        with self._lock:
            entry = self._entries.pop(binding, None)
        if entry is not None:
            _wipe(entry.key)

    def purge(self) -> None:
        """Drop every key whose window has closed."""
        now = self.clock()
        with self._lock:
            gone = [b for b, e in self._entries.items() if now - e.last_used >= e.ttl]
            entries = [self._entries.pop(b) for b in gone]
        for entry in entries:
            _wipe(entry.key)


def _wipe(key: bytearray) -> None:
    key[:] = bytes(len(key))


class CachingKeySource:
    """``inner`` with ``cache`` in front: a key kept for the binding serves an unlock with no
    request at all (no Secret read, no login); otherwise ``inner`` fetches it, and
    :meth:`succeeded` (the caller, once the unlock with that key succeeded) keeps it. ``binding``
    is computed once per unlock, when the session opens; None means "cannot bind" (say, the
    Secret is gone): no cache then, either way."""

    def __init__(
        self,
        inner: KeySource,
        cache: KeyCache,
        binding: Callable[[], Binding | None],
        ttl: float,
        tags: Iterable[Hashable] = (),
    ) -> None:
        self.inner, self.cache, self._binding, self.ttl = inner, cache, binding, ttl
        self.tags = tuple(tags)  # what revokes the key it keeps (KeyCache.drop)
        self._bound: Binding | None = None
        self._key: bytes | None = None  # the key this unlock used, until succeeded/failed
        self.hit = False

    def __repr__(self) -> str:
        return f"cached({self.inner!r}, {self.ttl:g}s)"

    def open(self) -> KeySession:
        self._bound = self._binding()
        cached = self.cache.get(self._bound) if self._bound is not None else None
        if cached is not None:
            self.hit = True
            return _CachedSession(self, cached)
        return _FetchingSession(self, self.inner.open())

    def succeeded(self) -> None:
        """The unlock with this key loaded and verified its images: keep (or refresh) it."""
        if self._bound is not None and self._key is not None:
            self.cache.used(self._bound, self._key, self.ttl, self.tags)
        self._key = None

    def failed(self, permanent: bool = True) -> None:
        """The unlock failed: nothing is kept from it. A kept key it used is dropped when the
        failure is permanent (an archive that does not decrypt with it: the key is worthless),
        and stays for a transient one (a runtime restart mid-load: the next try needs it)."""
        if permanent and self.hit and self._bound is not None:
            self.cache.discard(self._bound)
        self._key = None


class _CachedSession:
    def __init__(self, source: CachingKeySource, key: bytes) -> None:
        self._source, self._key = source, key

    def __repr__(self) -> str:
        return "<cached key session>"

    def authenticate(self, say: Say) -> None:
        return  # nothing to prove: the key was fetched with this Secret version before

    def get_key(self, say: Say) -> bytes:
        say(Phase.FETCHING_KEY, "using the key kept in memory (spec.keyCacheSeconds)")
        self._source._key = self._key
        return self._key

    def close(self) -> None:
        return


class _FetchingSession:
    def __init__(self, source: CachingKeySource, inner: KeySession) -> None:
        self._source, self._inner = source, inner

    def __repr__(self) -> str:
        return f"<caching {self._inner!r}>"

    def authenticate(self, say: Say) -> None:
        self._inner.authenticate(say)

    def get_key(self, say: Say) -> bytes:
        key = self._inner.get_key(say)
        self._source._key = key
        return key

    def close(self) -> None:
        self._inner.close()
