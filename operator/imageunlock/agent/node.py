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
from imageunlock.errors import ConfigurationError, UnlockError
from imageunlock.kube.client import KubernetesApi
from imageunlock.kube.models import NodeEntry
from imageunlock.kube.nodes import MAX_NODES, NodeInfo, compacted, find_entry, large_fleet, parse_selector

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


def _key(body: Mapping[str, Any]) -> ObjectKey:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


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
        # uid, and the entry this agent last applied to that object (its images in full)
        self._entries: dict[ObjectKey, tuple[str, NodeEntry]] = {}
        self._lock = threading.Lock()

    def observe(self, raw: Mapping[str, Any] | None) -> bool:
        """This node as a watch (KubernetesApi.follow_node) reports it; None: deleted. From the
        first report on, the node is never read again: the watch keeps it current. True when
        something the agent acts on changed (labels, taints, runtime, the DiskPressure
        condition; the first report): a heartbeat changes none of them."""
        info = NodeInfo.from_object(dict(raw)) if raw is not None else None
        with self._lock:
            changed = not self.watched or info != self._info
            self._info = info
            self.known = self.watched = True
        return changed

    def disk_pressure(self) -> bool:
        """Whether the Node reports DiskPressure (no import starts then)."""
        info = self.node_info()
        return info is not None and info.disk_pressure

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

    def entry(self, body: Mapping[str, Any]) -> NodeEntry:
        """This node's entry of ``body``: the one this agent last applied to that very object
        (its uid: one created anew under the same name starts afresh), else the one the object
        holds (e.g. after a restart: see find_entry), else a new one. Every entry the
        reconciler writes starts from it, and what it holds decides what is due."""
        with self._lock:
            uid, applied = self._entries.get(_key(body), ("", None))
        if applied is not None and uid == _uid(body):
            return applied
        held = find_entry(body.get("status"), self.node)
        return (
            NodeEntry(name=self.node, runtime=self.runtime)
            if held is None
            else held.model_copy(
                update={"runtime": self.runtime}  # the runtime this agent loads into now
            )
        )

    def has_entry(self, key: ObjectKey, body: Mapping[str, Any]) -> bool:
        with self._lock:
            return key in self._entries or find_entry(body.get("status"), self.node) is not None

    def apply(self, body: Mapping[str, Any], entry: NodeEntry) -> None:
        """Apply ``entry`` as this node's, whole (server-side apply drops a field left out),
        and keep it as the start of the next one. On a large fleet a Ready entry goes with the
        digest of its images; the list stays here, for this node's fast path."""
        key = _key(body)
        sent = compacted(entry) if large_fleet(body.get("status")) else entry
        self.kube.apply_node_entry(*key, self.node, sent.dump())
        with self._lock:
            self._entries[key] = (_uid(body), entry)

    def leave(self, namespace: str, name: str) -> None:
        """Remove this node's entry: the ImageUnlock no longer selects it (or it is gone)."""
        self.kube.apply_node_entry(namespace, name, self.node, None)
        self.forget((namespace, name))

    def forget(self, key: ObjectKey) -> None:
        with self._lock:
            self._entries.pop(key, None)
