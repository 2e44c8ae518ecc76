"""The credentials Secrets this agent follows (framework-free; the agent's event loop calls
:meth:`SecretWatches.sync`, watch threads call back).

README promises that fixing a Secret re-checks a Stalled ImageUnlock at once; without a
watch the re-check waited for the verify interval. One metadata-only watch per Secret that an
ImageUnlock served by this node names (``KubernetesApi.follow_secret``: a field selector on
its name, in the ImageUnlock's own namespace — the only namespace its credentials may come
from): when its resourceVersion changes (created, changed, deleted), ``changed`` is called
with ``(namespace, name)``. Only resourceVersions are kept here, never the Secret's data
(the watch does not even receive it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

SecretKey = tuple[str, str]  # (namespace, name)
Follow = Callable[[str, str, Callable[[str | None], None], threading.Event], None]

_UNSEEN = object()


class SecretWatches:
    def __init__(self, follow: Follow, changed: Callable[[SecretKey], None]) -> None:
        self._follow = follow
        self._changed = changed
        self._stops: dict[SecretKey, threading.Event] = {}
        self._versions: dict[SecretKey, object] = {}
        self._lock = threading.Lock()

    def sync(self, wanted: set[SecretKey]) -> None:
        """Follow exactly the Secrets in ``wanted``: start the missing watches, end the others."""
        for key in set(self._stops) - wanted:
            self._stops.pop(key).set()
            with self._lock:
                self._versions.pop(key, None)
        for key in wanted - set(self._stops):
            stop = threading.Event()
            self._stops[key] = stop
            with self._lock:
                self._versions[key] = _UNSEEN
            thread = threading.Thread(
                target=self._follow,
                args=(*key, self._reporter(key, stop), stop),
                name=f"secret-watch {key[0]}/{key[1]}",
                daemon=True,
            )
            thread.start()

    def followed(self) -> set[SecretKey]:
        return set(self._stops)

    def stop(self) -> None:
        self.sync(set())

    def _reporter(self, key: SecretKey, stop: threading.Event) -> Callable[[str | None], None]:
        def report(version: str | None) -> None:
            if stop.is_set():
                return
            with self._lock:
                before = self._versions.get(key, _UNSEEN)
                self._versions[key] = version
            # The first report is what the Secret was when the watch began: the object's own
            # first step reads it anyway. Every later change re-checks at once.
            if before is not _UNSEEN and before != version:
                log.debug("Secret %s/%s changed (resourceVersion %s)", *key, version)
                self._changed(key)

        return report
