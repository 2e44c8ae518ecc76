"""Nodes (pure): which nodes an ImageUnlock selects, which run an agent, and what runtime a
Node reports; finding a node's entry (``status.nodes[]``, kube/models.py NodeEntry) and
keeping it small on a large fleet.

Every agent owns one entry per ImageUnlock, keyed by its node name, and writes it with
server-side apply under its own field manager (see kube/client.py), so concurrent agents never
overwrite each other. An entry is kept small (no conditions; on a large fleet a digest for
its images): a cluster of 1000 nodes must stay far below the ~1.5 MiB object limit (README,
"Scale").
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from imageunlock.engine.models import Phase
from imageunlock.engine.runtimes import runtime_of
from imageunlock.errors import ConfigurationError
from imageunlock.kube.labels import LABEL_VALUE, is_label_key
from imageunlock.kube.models import Image, NodeEntry

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        if self.operator == "In":
            return labels.get(self.key) in self.values
        return labels.get(self.key) not in self.values  # NotIn: also true when the label is absent


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector: every requirement must hold; the empty selector selects all."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def parse_selector(raw: object, path: str = "spec.nodeSelector") -> LabelSelector:
    """Parse a ``{matchLabels, matchExpressions}`` selector, naming every problem at once."""
    if raw is None:
        return LabelSelector()
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{path} must be an object with matchLabels and/or matchExpressions")
    problems: list[str] = []
    requirements: list[Requirement] = []

    def key_ok(where: str, key: object) -> bool:
        if is_label_key(key):
            return True
        problems.append(f"{where} {key!r} is not a valid label key")
        return False

    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        problems.append(f"{path}.matchLabels must map label keys to values")
        labels = {}
    for key, value in labels.items():
        where = f"{path}.matchLabels"
        if key_ok(where, key):
            if not isinstance(value, str) or not re.fullmatch(LABEL_VALUE, value):
                problems.append(f"{where}[{key!r}] {value!r} is not a valid label value")
            else:
                requirements.append(Requirement(key, "In", frozenset([value])))
    expressions = raw.get("matchExpressions") or []
    if not isinstance(expressions, list):
        problems.append(f"{path}.matchExpressions must be a list")
        expressions = []
    for i, expr in enumerate(expressions):
        where = f"{path}.matchExpressions[{i}]"
        if not isinstance(expr, Mapping):
            problems.append(f"{where} must be an object with key, operator and values")
            continue
        operator, values = expr.get("operator"), expr.get("values") or []
        if not key_ok(f"{where}.key", expr.get("key")):
            continue
        if operator not in OPERATORS:
            problems.append(f"{where}.operator {operator!r} is not one of {', '.join(OPERATORS)}")
        elif not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            problems.append(f"{where}.values must be a list of strings")
        elif operator in ("In", "NotIn") and not values:
            problems.append(f"{where}: operator {operator} needs at least one value")
        elif operator in ("Exists", "DoesNotExist") and values:
            problems.append(f"{where}: operator {operator} takes no values")
        else:
            requirements.append(Requirement(str(expr["key"]), str(operator), frozenset(values)))
    if problems:
        raise ConfigurationError("; ".join(problems))
    return LabelSelector(tuple(requirements))


@dataclass(frozen=True)
class NodeInfo:
    """What the operator needs of a Node object."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    taints: tuple[Mapping[str, Any], ...] = ()
    runtime: str | None = (
        None  # a registered runtime's name (engine.runtimes), from status.nodeInfo.containerRuntimeVersion
    )
    disk_pressure: bool = False  # kubelet's DiskPressure condition is True: no import starts (agent)

    @classmethod
    def from_object(cls, node: Mapping[str, Any]) -> NodeInfo:
        meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
        return cls(
            name=str(meta.get("name") or ""),
            labels=dict(meta.get("labels") or {}),
            taints=tuple(t for t in spec.get("taints") or () if isinstance(t, Mapping)),
            runtime=runtime_of(((status.get("nodeInfo") or {}).get("containerRuntimeVersion")) or ""),
            disk_pressure=any(
                isinstance(c, Mapping) and c.get("type") == "DiskPressure" and c.get("status") == "True"
                for c in status.get("conditions") or ()
            ),
        )


def tolerates(tolerations: Sequence[Mapping[str, Any]], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' toleration matching, for one taint."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists":
            if not t.get("key") or t.get("key") == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


# What the DaemonSet controller adds to every DaemonSet's pods (so an agent stays on a node
# that is not ready, unreachable, cordoned or under pressure).
DAEMONSET_TOLERATIONS: tuple[Mapping[str, Any], ...] = tuple(
    {"key": f"node.kubernetes.io/{key}", "operator": "Exists", "effect": effect}
    for key, effect in (
        ("not-ready", "NoExecute"),
        ("unreachable", "NoExecute"),
        ("disk-pressure", "NoSchedule"),
        ("memory-pressure", "NoSchedule"),
        ("pid-pressure", "NoSchedule"),
        ("unschedulable", "NoSchedule"),
    )
)


@dataclass(frozen=True)
class Placement:
    """Where the agent DaemonSet runs: its nodeSelector and tolerations (the chart passes the
    same values to the controller), matched the way the DaemonSet controller matches them."""

    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()

    def runs_agent(self, node: NodeInfo) -> bool:
        if any(node.labels.get(k) != v for k, v in self.node_selector.items()):
            return False
        blocking = [t for t in node.taints if t.get("effect") in ("NoSchedule", "NoExecute")]
        return all(tolerates((*self.tolerations, *DAEMONSET_TOLERATIONS), t) for t in blocking)


# --- the per-node entry -------------------------------------------------------------------

# Scale (README, "Scale"): up to DETAILED_NODES selected nodes every Ready entry lists its
# images; beyond, a Ready entry writes only the digest of the list it verified (imagesDigest).
# A node trusts a list for its fast path only when that list's digest is the one its own
# entry holds: its own memory of what it verified, or the summary's list when the digests
# match. One ImageUnlock selects at most MAX_NODES nodes: past that the controller stalls it
# (TooManyNodes) and agents start nothing, so the object never nears the ~1.5 MiB limit.
DETAILED_NODES = 200
MAX_NODES = 1000


def images_digest(images: Sequence[Image]) -> str:
    """sha256 over the sorted ``name=id`` lines of an image list."""
    lines = sorted(f"{i.name}={i.id}" for i in images)
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def large_fleet(status: Mapping[str, Any] | None) -> bool:
    """Whether Ready entries keep only a digest: the ImageUnlock selects many nodes."""
    return int((status or {}).get("nodesDesired") or 0) > DETAILED_NODES


def compacted(entry: NodeEntry) -> NodeEntry:
    """``entry`` as a large fleet writes it: Ready, it holds the digest of its images, not the
    list; what it reclaimed last, without the lists of refs (their count stays)."""
    if entry.reclaimed is not None and (entry.reclaimed.refs or entry.reclaimed.kept):
        entry = entry.model_copy(update={"reclaimed": entry.reclaimed.model_copy(update={"refs": None, "kept": None})})
    if entry.phase is not Phase.READY or not entry.images:
        return entry
    return entry.model_copy(update={"images": None, "images_digest": images_digest(entry.images)})


def find_entry(status: Mapping[str, Any] | None, node: str) -> NodeEntry | None:
    """This node's entry of ``status.nodes``. One that holds only the digest of its images
    gets the summary's list (``status.images``) when that is the list it digests, and else
    none: never a list this node did not verify."""
    raw = next((e for e in (status or {}).get("nodes") or () if isinstance(e, Mapping) and e.get("name") == node), None)
    if raw is None:
        return None
    entry = NodeEntry.model_validate(dict(raw))
    if entry.images or not entry.images_digest:
        return entry
    summary = [Image.model_validate(dict(i)) for i in (status or {}).get("images") or () if isinstance(i, Mapping)]
    if summary and images_digest(summary) == entry.images_digest:
        return entry.model_copy(update={"images": summary, "images_digest": None})
    return entry
