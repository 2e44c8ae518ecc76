"""The credentials Secrets this agent follows (framework-free; the agent's event loop calls
:meth:`SecretWatches.sync`, watch threads call back).

README promises that fixing a Secret re-checks a Stalled ImageUnlock at once; without a
watch the re-check waited for the verify interval. One metadata-only watch per Secret that an
ImageUnlock served by this node names (``KubernetesApi.follow_secret``: a field selector on
its name, in the ImageUnlock's own namespace — the only namespace its credentials may come
from): when its resourceVersion changes (created, changed, deleted), ``changed`` is called
with ``(namespace, name)``. Only resourceVersions are kept here, never the Secret's data
(the watch does not even receive it).

Bounded: the agent asks only for the Secrets its objects wait for (agent/handlers.py), and at
most ``limit`` watches run (MAX_WATCHES); beyond that the rest are re-checked at the verify
interval, said once at WARNING. A watch ended here stops at once (its StopEvent cuts the
open response), not when the server ends it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from imageunlock.engine.models import Phase
from imageunlock.errors import (
    ApiRejectedError,
    AuthenticationError,
    AwaitingLoginVerdictError,
    ConfigurationError,
)
from imageunlock.kube.client import StopEvent
from imageunlock.kube.models import NodeEntry

log = logging.getLogger(__name__)

SecretKey = tuple[str, str]  # (namespace, name)
Follow = Callable[[str, str, Callable[[str | None], None], threading.Event], None]

_UNSEEN = object()
MAX_WATCHES = 50  # Secret watches per agent: one thread and one API server watch each
# Why a node's entry can wait for its Secret: a missing or incomplete one (InvalidConfiguration),
# credentials refused, a login verdict awaited for this Secret version, a key request refused.
WAITS_FOR_SECRET = frozenset(
    {ConfigurationError.reason, AuthenticationError.reason, AwaitingLoginVerdictError.reason, ApiRejectedError.reason}
)


def waits_for_secret(entry: NodeEntry) -> bool:
    """Whether this node's entry is Stalled or retrying on something a Secret change may fix
    (a Ready one needs no watch: nothing reads the Secret while its images are in place)."""
    return entry.phase is Phase.FAILED and entry.reason in WAITS_FOR_SECRET


class SecretWatches:
    def __init__(
        self,
        follow: Follow,
        changed: Callable[[SecretKey], None],
        began: Callable[[SecretKey], None] | None = None,
        limit: int = MAX_WATCHES,
    ) -> None:
        self._follow = follow
        self._changed = changed
        # The Secret exists when its watch begins: it may have been created after the step
        # that found it missing (the watch starts only then), so its objects are looked at.
        self._began = began
        self.limit = limit
        self._stops: dict[SecretKey, threading.Event] = {}
        self._versions: dict[SecretKey, object] = {}
        self._lock = threading.Lock()
        self._over = False  # said at WARNING that some Secrets go unwatched (once per episode)

    def sync(self, wanted: set[SecretKey]) -> None:
        """Follow the Secrets in ``wanted`` (at most ``limit``; the ones already followed
        first): start the missing watches, end the others."""
        for key in set(self._stops) - wanted:
            self._stops.pop(key).set()
            with self._lock:
                self._versions.pop(key, None)
        room = max(0, self.limit - len(self._stops))
        missing = sorted(wanted - set(self._stops))
        if len(missing) > room:
            if not self._over:
                log.warning(
                    "%d credentials Secrets to follow, at most %d watches per agent: the others are "
                    "re-checked at the verify interval, not at once",
                    len(wanted),
                    self.limit,
                )
            self._over = True
        else:
            self._over = False
        for key in missing[:room]:
            stop = StopEvent()
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
            # The first report is what the Secret was when the watch began: if it exists, its
            # objects (which wait for it) are looked at, without revoking anything. Every later
            # change re-checks at once.
            if before is _UNSEEN:
                if version is not None and self._began is not None:
                    self._began(key)
            elif before != version:
                log.debug("Secret %s/%s changed (resourceVersion %s)", *key, version)
                self._changed(key)

        return report
