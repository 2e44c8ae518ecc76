"""The readiness label (pure): which Nodes carry ``<spec.readinessLabel>=<spec.version>``, and
the patches that bring every Node there (issue 20, item 4).

A node carries a key when every ImageUnlock that names that key and selects the node is Ready
there for its current generation, all at one version: two ImageUnlocks that share a key
therefore never fight over it (one removing what the other set), and the label means "every
ImageUnlock behind it is usable here". Any other node does not carry it: not Ready, not
selected (or an invalid selector, or more than MAX_NODES), the ImageUnlock deleted.

A key belongs to one namespace: that of the oldest ImageUnlock naming it (creationTimestamp,
ties by namespace name; no state kept, every replica finds the same owner). The ImageUnlocks
of any other namespace naming it are ignored for the label (``foreign_claims`` names them, the
controller logs them): otherwise a tenant could strip another tenant's label from every node
with an object that is never Ready, or set it where the owner's images are not.

Keys the controller set are listed on the Node in the annotation MANAGED, so a key whose
ImageUnlock was deleted while no controller ran (there is no finalizer: deletion stays
instant) is still found and removed at start-up. A label the controller did not set is never
overwritten nor removed (whoever may create an ImageUnlock names the key: it must not be able
to strip or rewrite the labels other workloads select nodes by); such a node just does not
get the readiness label until that label is gone. Nor does a key in MANAGED that is no valid
readiness key (reserved, say): whoever can write the annotation (a node's kubelet, another
controller) must not get the controller to remove a label it may not touch itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imageunlock.controller.summary import fleet
from imageunlock.kube.labels import readiness_key_problem, readiness_problems
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


def usable_key(body: Mapping[str, Any]) -> str | None:
    """The readiness key an ImageUnlock names, if this operator may write it; else None."""
    spec = body.get("spec") or {}
    key = spec.get("readinessLabel")
    if not key:
        return None
    problems = readiness_problems(key, spec.get("version"), selector_keys(spec))
    if any("readinessLabel" in p for p in problems):
        return None  # not a key this operator may write: nothing to set or remove for it
    return str(key)


def _meta(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body.get("metadata") or {}
    return str(meta.get("creationTimestamp") or ""), str(meta.get("namespace") or ""), str(meta.get("name") or "")


def key_owners(objects: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Per key, the namespace it belongs to: that of the oldest ImageUnlock naming it
    (creationTimestamp, RFC 3339 in UTC as the API server writes it, so it sorts as text;
    ties by namespace name)."""
    oldest: dict[str, tuple[str, str]] = {}
    for body in objects:
        if (key := usable_key(body)) is not None:
            created, namespace, _ = _meta(body)
            oldest[key] = min(oldest.get(key, (created, namespace)), (created, namespace))
    return {key: namespace for key, (_, namespace) in oldest.items()}


def foreign_claims(objects: Iterable[Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """The ImageUnlocks ignored for the label, as (namespace, name, key, owning namespace):
    they name a key that belongs to another namespace."""
    objects = list(objects)
    owners = key_owners(objects)
    found = []
    for body in objects:
        if (key := usable_key(body)) is not None and (owner := owners[key]) != (namespace := _meta(body)[1]):
            found.append((namespace, _meta(body)[2], key, owner))
    return sorted(found)


def readiness(body: Mapping[str, Any], nodes: Sequence[NodeInfo], placement: Placement) -> Readiness | None:
    """What one ImageUnlock wants of its readiness label; None without one. An unusable key
    sets nothing; a version that is no valid label value (which the CRD refuses) leaves the
    key off every node it selects."""
    key = usable_key(body)
    if key is None:
        return None
    spec = body.get("spec") or {}
    version = spec.get("version")
    problems = readiness_problems(key, version, selector_keys(spec))
    f = fleet(body, nodes, placement, now="")
    value = None if problems else str(version)
    ready = set(f.ready)
    return Readiness(str(key), {n: value if n in ready else None for n in f.desired})


def desired_labels(
    objects: Iterable[Mapping[str, Any]], nodes: Sequence[NodeInfo], placement: Placement
) -> tuple[set[str], dict[str, dict[str, str]]]:
    """The keys the ImageUnlocks name, and per node the readiness labels it should carry. Only
    the ImageUnlocks of the namespace a key belongs to (``key_owners``) decide its label."""
    objects = list(objects)
    owners = key_owners(objects)
    keys: set[str] = set()
    wants: dict[tuple[str, str], set[str | None]] = {}
    for body in objects:
        found = readiness(body, nodes, placement)
        if found is None or owners[found.key] != _meta(body)[1]:
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
    """The keys the annotation MANAGED of a Node object lists, but only those a readiness label
    may have (``trusted_keys``)."""
    annotations = (raw.get("metadata") or {}).get("annotations") or {}
    return trusted_keys(str(annotations.get(MANAGED) or "").split(","))


def trusted_keys(keys: Iterable[str]) -> frozenset[str]:
    """The keys of MANAGED the controller may touch: never an invalid or reserved one. The
    annotation is on the Node, so whoever can write it (the node's kubelet, another controller)
    could otherwise list ``node-role.kubernetes.io/...`` and have the controller remove it."""
    return frozenset(k for k in keys if k and readiness_key_problem(k) is None)


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
        mine = trusted_keys(managed.get(node.name, frozenset()))
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
