"""One login verdict for the fleet (issue 21, item 5): a key source wrapper (framework-free,
blocking: called from the unlock service on a worker thread).

Every node logs in with the same Secret. When the resource API refused that login (401/403)
for a resourceVersion of the Secret, the node's entry records it (``loginRefusedVersion``)
and every other node, whose attempt would send the same password, takes the verdict instead
of a request of its own: a wrong password costs one refused login, not one per node (at fleet
size enough to lock the account). A changed Secret (a new resourceVersion) is tried again.

Nodes that all look at once (the Secret watch pokes every node of a fleet stalled on refused
credentials together) take turns: the first of them by name tries the new resourceVersion,
the others wait for its verdict (a short transient retry, at most ``WAIT_FOR_LEADER``
seconds, in case that node is gone), then adopt a refusal or, if it got in, log in
themselves. A new ImageUnlock has no entries yet: its nodes' first logins are not shared.

Nothing secret is read or kept here: resourceVersions and node names only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imageunlock.engine.models import KeySession, KeySource, Say
from imageunlock.errors import AuthenticationError, AwaitingLoginVerdictError, LoginRefusedError
from imageunlock.kube.models import NodeEntry

WAIT_FOR_LEADER = 20.0  # seconds a node waits for another node's verdict before trying itself
REFUSED = "AuthenticationFailed"


def refused_by(entries: Sequence[NodeEntry], me: str, generation: int, version: str) -> str | None:
    """The node whose login was refused for this Secret ``version`` (same generation: the
    same spec, so the same resource API), if any other node's was."""
    for entry in entries:
        if (
            entry.name != me
            and entry.login_refused_version == version
            and entry.observed_generation == generation
            and entry.reason == REFUSED
        ):
            return entry.name
    return None


def untried(entries: Sequence[NodeEntry], generation: int, version: str) -> set[str]:
    """Nodes stalled on refused credentials for this generation that have not tried
    ``version`` of the Secret yet."""
    return {
        entry.name
        for entry in entries
        if entry.reason == REFUSED
        and entry.observed_generation == generation
        and entry.login_refused_version != version
    }


@dataclass
class LoginVerdicts:
    """What this node knows of its fleet's logins: when it started waiting for whom."""

    clock: Callable[[], float] = time.monotonic
    _waiting: dict[tuple[Any, ...], tuple[float, str]] = field(default_factory=dict)

    def wrap(
        self,
        inner: KeySource,
        *,
        node: str,
        body: Mapping[str, Any],
        secret: str,
        version: Callable[[], str | None],
        refused: Callable[[str], None],
    ) -> KeySource:
        """``inner`` with the fleet's verdict in front of its login. ``version`` reads the
        Secret's resourceVersion; ``refused(version)`` is told when this node's login (or the
        verdict it adopted) was refused for it."""
        return _VerdictKeySource(self, inner, node, body, secret, version, refused)

    def waiting_for(self, key: tuple[Any, ...], entries: Sequence[NodeEntry], me: str, version: str) -> str | None:
        """The node this one waits for before its own login with ``version`` (None: go).
        Among the nodes that have not tried this version (this one included), the first by
        name goes; the others wait for it — until it has tried (its entry changed: refused,
        which they adopt, or not, and they go) or for WAIT_FOR_LEADER seconds."""
        generation = key[1]
        pending = untried(entries, generation, version)
        if key in self._waiting:  # waiting already (this node's own entry now says so, not refused)
            since, first = self._waiting[key]
            return first if first in pending and self.clock() - since < WAIT_FOR_LEADER else None
        if me not in pending:
            return None
        first = min(pending)
        if first == me:
            return None
        if len(self._waiting) > 10_000:
            self._waiting.clear()
        self._waiting[key] = (self.clock(), first)
        return first


@dataclass
class _VerdictKeySource:
    verdicts: LoginVerdicts
    inner: KeySource
    node: str
    body: Mapping[str, Any]
    secret: str
    version: Callable[[], str | None]
    refused: Callable[[str], None]

    def __repr__(self) -> str:
        return f"verdict-shared {self.inner!r}"

    def open(self) -> KeySession:
        return _VerdictSession(self, self.inner.open())


class _VerdictSession:
    def __init__(self, source: _VerdictKeySource, inner: KeySession) -> None:
        self.source, self.inner = source, inner

    def __repr__(self) -> str:
        return f"<verdict-shared {self.inner!r}>"

    def authenticate(self, say: Say) -> None:
        source = self.source
        version = source.version()
        if version is None:  # no version to bind a verdict to: as before
            self.inner.authenticate(say)
            return
        meta = source.body.get("metadata") or {}
        generation = int(meta.get("generation") or 0)
        entries = _entries(source.body)
        namespace = str(meta.get("namespace") or "")
        where = f"Secret {namespace}/{source.secret}"
        if (node := refused_by(entries, source.node, generation, version)) is not None:
            source.refused(version)
            raise AuthenticationError(
                f"the resource API refused the login with {where} (resourceVersion {version}) on node "
                f"{node}; not tried again with the same Secret: fix its email and password"
            )
        key = (meta.get("uid"), generation, version)
        if (first := source.verdicts.waiting_for(key, entries, source.node, version)) is not None:
            raise AwaitingLoginVerdictError(
                f"waiting for node {first}'s login with {where} (resourceVersion {version})"
            )
        try:
            self.inner.authenticate(say)
        except LoginRefusedError:
            source.refused(version)
            raise

    def get_key(self, say: Say) -> bytes:
        return self.inner.get_key(say)

    def close(self) -> None:
        self.inner.close()


def _entries(body: Mapping[str, Any]) -> list[NodeEntry]:
    found = []
    for raw in (body.get("status") or {}).get("nodes") or ():
        try:
            found.append(NodeEntry.model_validate(raw))
        except ValueError:
            continue
    return found
