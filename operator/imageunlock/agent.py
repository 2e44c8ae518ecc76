"""One node's agent (framework-free, blocking: called from worker threads).

It knows its node (``NODE_NAME``, from the downward API) and reads that Node now and then:
its labels decide which ImageUnlocks select it (``spec.nodeSelector``), its
``status.nodeInfo.containerRuntimeVersion`` which runtime kubelet uses. For every
ImageUnlock it writes one entry of ``status.nodes`` (its own, keyed by the node name, by
server-side apply under its own field manager) and nothing else: the cluster summary is
the controller's (controller.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigurationError, UnlockError
from .kube import KubernetesApi
from .nodes import MAX_NODES, NodeInfo, find_entry, merge_entry, parse_selector, summary_images, view

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str]


def resolve_runtime(setting: str, node: NodeInfo | None, node_name: str) -> str:
    """The runtime to load into: the setting, or for ``auto`` the one the Node reports."""
    if setting != "auto":
        return setting
    if node is None:
        raise ConfigurationError(
            f"Node {node_name!r} not found, so its runtime is unknown: check NODE_NAME, or set "
            "IMAGEUNLOCK_RUNTIME to docker or containerd"
        )
    if node.runtime is None:
        raise ConfigurationError(
            f"Node {node_name!r} reports no runtime this agent loads into "
            "(status.nodeInfo.containerRuntimeVersion is neither docker:// nor containerd://): "
            "set IMAGEUNLOCK_RUNTIME to docker or containerd"
        )
    return node.runtime


class NodeAgent:
    def __init__(
        self,
        kube: KubernetesApi,
        node: str,
        runtime: str,
        refresh: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.node, self.runtime = kube, node, runtime
        self.refresh, self.clock = refresh, clock
        self._info: NodeInfo | None = None
        self._read_at = float("-inf")
        self._entries: dict[ObjectKey, dict[str, Any]] = {}  # what this agent last applied
        self._summary: dict[ObjectKey, list[dict[str, str]] | None] = {}  # see nodes.summary_images
        self._lock = threading.Lock()

    def node_info(self) -> NodeInfo | None:
        """This node as last read (at most ``refresh`` seconds old); None once it is deleted.
        When the API server cannot be reached the last answer stands."""
        if self.clock() - self._read_at >= self.refresh:
            try:
                raw = self.kube.read_node(self.node)
            except UnlockError as exc:
                log.info("Node %s not re-read: %s", self.node, exc.message)
            else:
                self._info = NodeInfo.from_object(raw) if raw is not None else None
            self._read_at = self.clock()
        return self._info

    def selected(self, body: Mapping[str, Any]) -> bool:
        """Whether the ImageUnlock selects this node (an invalid selector selects nothing:
        the controller reports it)."""
        info = self.node_info()
        if info is None or int((body.get("status") or {}).get("nodesDesired") or 0) > MAX_NODES:
            return False  # past MAX_NODES the controller stalls it: no entries then
        try:
            selector = parse_selector((body.get("spec") or {}).get("nodeSelector"))
        except ConfigurationError:
            return False
        return selector.matches(info.labels)

    def view(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return view(body, self.node)

    def has_entry(self, key: ObjectKey, body: Mapping[str, Any]) -> bool:
        with self._lock:
            return key in self._entries or find_entry(body.get("status"), self.node) is not None

    def seed(self, key: ObjectKey, body: Mapping[str, Any]) -> None:
        """Start from the entry the object holds (e.g. after a restart): writes merge into it.
        Note the summary's images, which a Ready entry need not repeat on a large fleet."""
        generation = int((body.get("metadata") or {}).get("generation") or 0)
        with self._lock:
            self._summary[key] = summary_images(body.get("status"), generation)
            if key not in self._entries and (entry := find_entry(body.get("status"), self.node)) is not None:
                self._entries[key] = entry

    def write(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """The reconciler's status sink: fold ``status`` into this node's entry and apply it."""
        key = (namespace, name)
        with self._lock:
            entry = merge_entry(self._entries.get(key), self.node, self.runtime, status, self._summary.get(key))
        self.kube.apply_node_entry(namespace, name, self.node, entry)
        with self._lock:
            self._entries[key] = entry

    def leave(self, namespace: str, name: str) -> None:
        """Remove this node's entry: the ImageUnlock no longer selects it (or it is gone)."""
        self.kube.apply_node_entry(namespace, name, self.node, None)
        self.forget((namespace, name))

    def forget(self, key: ObjectKey) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._summary.pop(key, None)
