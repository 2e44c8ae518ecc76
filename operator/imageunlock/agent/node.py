"""One node's agent (framework-free, blocking: called from worker threads).

It knows its node (``NODE_NAME``, from the downward API) and follows that Node with a watch:
its labels decide which ImageUnlocks select it (``spec.nodeSelector``), its
``status.nodeInfo.containerRuntimeVersion`` which runtime kubelet uses. For every
ImageUnlock it writes one entry of ``status.nodes`` (its own, keyed by the node name, by
server-side apply under its own field manager) and nothing else: the cluster summary is
the controller's (controller/handlers.py).

Per-object state is tied to the object's uid: an ImageUnlock deleted and created again
under the same name starts afresh, whatever a late write of the old one left behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from imageunlock.engine import runtimes
from imageunlock.engine.models import Phase
from imageunlock.errors import ConfigurationError, UnlockError
from imageunlock.kube.client import KubernetesApi
from imageunlock.kube.nodes import MAX_NODES, NodeInfo, compact, find_entry, merge_entry, parse_selector, view

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str]


def resolve_runtime(setting: str, node: NodeInfo | None, node_name: str) -> str:
    """The runtime to load into: the setting, or for ``auto`` the one the Node reports."""
    if setting != runtimes.AUTO:
        return setting
    named = runtimes.listed(runtimes.names())
    if node is None:
        raise ConfigurationError(
            f"Node {node_name!r} not found, so its runtime is unknown: check NODE_NAME, or set "
            f"IMAGEUNLOCK_RUNTIME to {named}"
        )
    if node.runtime is None:
        schemes = runtimes.listed(tuple(f"{k.cri_scheme}://" for k in runtimes.kinds()), "nor")
        raise ConfigurationError(
            f"Node {node_name!r} reports no runtime this agent loads into "
            f"(status.nodeInfo.containerRuntimeVersion is neither {schemes}): "
            f"set IMAGEUNLOCK_RUNTIME to {named}"
        )
    return node.runtime


def _uid(body: Mapping[str, Any]) -> str:
    return str((body.get("metadata") or {}).get("uid") or "")


def _generation(body: Mapping[str, Any]) -> int:
    return int((body.get("metadata") or {}).get("generation") or 0)


def counted(body: Mapping[str, Any]) -> bool:
    """Whether the controller has counted this generation's nodes, and they are not too many:
    only then does a node start it (a selection of more than MAX_NODES nodes starts nothing)."""
    status = body.get("status") or {}
    return status.get("observedGeneration") == _generation(body) and int(status.get("nodesDesired") or 0) <= MAX_NODES


class NodeAgent:
    def __init__(
        self,
        kube: KubernetesApi,
        node: str,
        runtime: str,
        info: NodeInfo | None = None,
        refresh: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.node, self.runtime = kube, node, runtime
        self.refresh, self.clock = refresh, clock
        self._info = info
        self.known = info is not None  # the Node has been read at least once (or found deleted)
        self.watched = False  # a watch reports the Node: no reads
        self._read_at = clock() if info is not None else float("-inf")
        self._entries: dict[ObjectKey, tuple[str, dict[str, Any]]] = {}  # uid, what this agent last applied
        self._verified: dict[ObjectKey, tuple[str, int, list[dict[str, Any]]]] = {}  # uid, generation, images
        self._compact: dict[ObjectKey, bool] = {}
        self._lock = threading.Lock()

    def observe(self, raw: Mapping[str, Any] | None) -> None:
        """This node as a watch (KubernetesApi.follow_node) reports it; None: deleted. From the
        first report on, the node is never read again: the watch keeps it current."""
        with self._lock:
            self._info = NodeInfo.from_object(dict(raw)) if raw is not None else None
            self.known = self.watched = True

    def node_info(self) -> NodeInfo | None:
        """This node as last seen: as the watch reports it, or else as last read (at most
        ``refresh`` seconds old); None once it is deleted. When the API server cannot be
        reached the last answer stands."""
        if self.watched:
            return self._info
        if self.clock() - self._read_at >= self.refresh:
            try:
                raw = self.kube.read_node(self.node)
            except UnlockError as exc:
                log.info("Node %s not re-read: %s", self.node, exc.message)
            else:
                self._info = NodeInfo.from_object(raw) if raw is not None else None
                self.known = True
            self._read_at = self.clock()
        return self._info

    def selected(self, body: Mapping[str, Any]) -> bool | None:
        """Whether the ImageUnlock selects this node; None while the Node was never read (a
        failed first read says nothing: no entry is removed for it). An invalid selector
        selects nothing (the controller reports it)."""
        info = self.node_info()
        if not self.known:
            return None
        if info is None or int((body.get("status") or {}).get("nodesDesired") or 0) > MAX_NODES:
            return False  # deleted, or past MAX_NODES (the controller stalls it: no entries then)
        try:
            selector = parse_selector((body.get("spec") or {}).get("nodeSelector"))
        except ConfigurationError:
            return False
        return selector.matches(info.labels)

    def view(self, body: Mapping[str, Any]) -> dict[str, Any]:
        meta = body.get("metadata") or {}
        with self._lock:
            uid, generation, images = self._verified.get(
                (str(meta.get("namespace")), str(meta.get("name"))), ("", 0, [])
            )
        remembered = images if (uid, generation) == (_uid(body), _generation(body)) else None
        return view(body, self.node, remembered)

    def has_entry(self, key: ObjectKey, body: Mapping[str, Any]) -> bool:
        with self._lock:
            return bool(self._entries.get(key, ("", {}))[1]) or find_entry(body.get("status"), self.node) is not None

    def seed(self, key: ObjectKey, body: Mapping[str, Any]) -> None:
        """Before a step: start from the entry the object holds (e.g. after a restart) unless
        this agent applied one for this very object; drop what belonged to an earlier object
        of the same name; note whether Ready entries keep only a digest (a large fleet)."""
        uid = _uid(body)
        with self._lock:
            if key in self._entries and self._entries[key][0] != uid:
                self._entries.pop(key, None)
                self._verified.pop(key, None)
            if key not in self._entries and (entry := find_entry(body.get("status"), self.node)) is not None:
                self._entries[key] = (uid, entry)
            self._entries.setdefault(key, (uid, {}))
            self._compact[key] = compact(body.get("status"))

    def write(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """The reconciler's status sink: fold ``status`` into this node's entry and apply it;
        remember the images a Ready verdict verified (for the fast path of a compact entry)."""
        key = (namespace, name)
        with self._lock:
            uid, previous = self._entries.get(key, ("", {}))
            full = merge_entry(previous, self.node, self.runtime, status)
            entry = merge_entry(previous, self.node, self.runtime, status, self._compact.get(key, False))
        self.kube.apply_node_entry(namespace, name, self.node, entry)
        with self._lock:
            self._entries[key] = (uid, entry)
            if "images" in status and full.get("phase") == Phase.READY.value and full.get("images"):
                self._verified[key] = (uid, int(full.get("observedGeneration") or 0), full["images"])
            elif "images" in status:
                self._verified.pop(key, None)

    def leave(self, namespace: str, name: str) -> None:
        """Remove this node's entry: the ImageUnlock no longer selects it (or it is gone)."""
        self.kube.apply_node_entry(namespace, name, self.node, None)
        self.forget((namespace, name))

    def forget(self, key: ObjectKey) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._verified.pop(key, None)
            self._compact.pop(key, None)
