"""The readiness label (pure): which Nodes carry ``<spec.readinessLabel>=<spec.version>``, and
the patches that bring every Node there (issue 20, item 4).

A node carries a key when every ImageUnlock that names that key and selects the node is Ready
there for its current generation, all at one version: two ImageUnlocks that share a key
therefore never fight over it (one removing what the other set), and the label means "every
ImageUnlock behind it is usable here". Any other node does not carry it: not Ready, not
selected (or an invalid selector, or more than MAX_NODES), the ImageUnlock deleted.

Keys the controller set are listed on the Node in the annotation MANAGED, so a key whose
ImageUnlock was deleted while no controller ran (there is no finalizer: deletion stays
instant) is still found and removed at start-up. A label the controller did not set is never
overwritten nor removed (whoever may create an ImageUnlock names the key: it must not be able
to strip or rewrite the labels other workloads select nodes by); such a node just does not
get the readiness label until that label is gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imageunlock.controller.summary import fleet
from imageunlock.kube.labels import readiness_problems
from imageunlock.kube.nodes import NodeInfo, Placement

MANAGED = "loader.azaion.com/readiness-labels"  # the keys this operator set on the Node, comma-separated


@dataclass(frozen=True)
class Readiness:
    """One ImageUnlock's readiness label: its key, and the value each selected node wants
    (the version when Ready for the current generation, else None)."""

    key: str
    wants: Mapping[str, str | None]


def selector_keys(spec: Mapping[str, Any]) -> set[str]:
    selector = spec.get("nodeSelector") or {}
    if not isinstance(selector, Mapping):
        return set()
    keys = set((selector.get("matchLabels") or {}) if isinstance(selector.get("matchLabels"), Mapping) else ())
    keys |= {str(e.get("key")) for e in selector.get("matchExpressions") or () if isinstance(e, Mapping)}
    return keys


def readiness(body: Mapping[str, Any], nodes: Sequence[NodeInfo], placement: Placement) -> Readiness | None:
    """What one ImageUnlock wants of its readiness label; None without one. An unusable key
    sets nothing; a version that is no valid label value (which the CRD refuses) leaves the
    key off every node it selects."""
    spec = body.get("spec") or {}
    key, version = spec.get("readinessLabel"), spec.get("version")
    if not key:
        return None
    problems = readiness_problems(key, version, selector_keys(spec))
    if problems and any("readinessLabel" in p for p in problems):
        return None  # not a key this operator may write: nothing to set or remove for it
    f = fleet(body, nodes, placement, now="")
    value = None if problems else str(version)
    ready = set(f.ready)
    return Readiness(str(key), {n: value if n in ready else None for n in f.desired})


def desired_labels(
    objects: Iterable[Mapping[str, Any]], nodes: Sequence[NodeInfo], placement: Placement
) -> tuple[set[str], dict[str, dict[str, str]]]:
    """The keys the ImageUnlocks name, and per node the readiness labels it should carry."""
    keys: set[str] = set()
    wants: dict[tuple[str, str], set[str | None]] = {}
    for body in objects:
        found = readiness(body, nodes, placement)
        if found is None:
            continue
        keys.add(found.key)
        for node, value in found.wants.items():
            wants.setdefault((node, found.key), set()).add(value)
    labels: dict[str, dict[str, str]] = {}
    for (node, key), values in wants.items():
        if len(values) == 1 and (value := next(iter(values))) is not None:
            labels.setdefault(node, {})[key] = value
    return keys, labels


def managed_keys(raw: Mapping[str, Any]) -> frozenset[str]:
    """The keys the annotation MANAGED of a Node object lists."""
    annotations = (raw.get("metadata") or {}).get("annotations") or {}
    return frozenset(k for k in str(annotations.get(MANAGED) or "").split(",") if k)


def label_patches(
    objects: Iterable[Mapping[str, Any]],
    nodes: Sequence[NodeInfo],
    placement: Placement,
    managed: Mapping[str, frozenset[str]],
) -> dict[str, dict[str, Any]]:
    """Per node that needs one, the merge patch of its labels and of MANAGED: every key an
    ImageUnlock names or this operator set on the node goes to its due value (None: removed),
    except a label of that key the operator did not set."""
    keys, desired = desired_labels(objects, nodes, placement)
    patches: dict[str, dict[str, Any]] = {}
    for node in nodes:
        due = desired.get(node.name, {})
        mine = managed.get(node.name, frozenset())
        ours = {k for k in keys | mine if k in mine or k not in node.labels}  # never someone else's label
        labels = {k: due.get(k) for k in sorted(ours) if node.labels.get(k) != due.get(k)}
        now_managed = ",".join(sorted(k for k in due if k in ours)) or None
        meta: dict[str, Any] = {}
        if labels:
            meta["labels"] = labels
        if now_managed != (",".join(sorted(mine)) or None):
            meta["annotations"] = {MANAGED: now_managed}
        if meta:
            patches[node.name] = {"metadata": meta}
    return patches
