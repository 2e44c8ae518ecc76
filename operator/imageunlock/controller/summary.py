"""The cluster summary of one ImageUnlock (pure): kstatus conditions, phase, ``NODES``
(ready/desired) and the aggregate fields, computed by the controller from the per-node
entries the agents wrote and the Nodes the ImageUnlock selects.

Ready only when every selected node has a Ready entry for the current generation: ``kubectl
wait --for=condition=Ready`` means "usable everywhere it should be". Stalled as soon as one
selected node is stuck on a user mistake (the message names it), Reconciling while any
selected node still works or has not reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from imageunlock.engine.models import Phase
from imageunlock.errors import ConfigurationError
from imageunlock.kube import conditions as st
from imageunlock.kube.nodes import MAX_NODES, NodeInfo, Placement, images_digest, parse_selector

# Least advanced first: the summary of nodes still working shows the one furthest behind.
_ORDER = [Phase.PENDING, Phase.AUTHENTICATING, Phase.FETCHING_KEY, Phase.LOADING, Phase.VERIFYING]
NAMED = 3  # nodes named in a message before "and N more"


@dataclass(frozen=True)
class Summary:
    status: dict[str, Any]  # the top-level fields (merge patch; never status.nodes)
    prune: tuple[str, ...]  # entries of nodes no longer selected or gone


def desired_nodes(
    spec: Mapping[str, Any], nodes: Sequence[NodeInfo], placement: Placement, reporting: set[str]
) -> list[str]:
    """Selected nodes that run an agent: by the agents' placement, or because their agent
    reported (an agent placed beyond what the controller was told still counts)."""
    selector = parse_selector(spec.get("nodeSelector"))
    return sorted(
        n.name for n in nodes if selector.matches(n.labels) and (placement.runs_agent(n) or n.name in reporting)
    )


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:NAMED])
    return shown + (f" and {len(items) - NAMED} more" if len(items) > NAMED else "")


def summarize(
    body: Mapping[str, Any], nodes: Sequence[NodeInfo], placement: Placement, now: str | None = None
) -> Summary:
    now = now or st.now_rfc3339()
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    status = body.get("status") or {}
    generation = int(meta.get("generation") or 0)
    previous = status.get("conditions")
    entries = {e["name"]: e for e in status.get("nodes") or () if isinstance(e, Mapping) and e.get("name")}
    # An agent beyond the placement counts while it reports on this generation or works on it
    # (its entry at an older generation, not working, is a leftover: pruned).
    reporting = {n for n, e in entries.items() if e.get("observedGeneration") == generation or e.get("phase") in _ORDER}
    try:
        desired = desired_nodes(spec, nodes, placement, reporting)
    except ConfigurationError as exc:  # a bad spec.nodeSelector: the agents select nothing either
        return Summary(_stalled(exc.reason, exc.message, generation, previous, now), tuple(sorted(entries)))
    wanted = set(desired)
    prune = tuple(sorted(name for name in entries if name not in wanted))
    if len(desired) > MAX_NODES:  # the agents then write no entry (object size: README, "Scale")
        message = (
            f"spec.nodeSelector selects {len(desired)} nodes; one ImageUnlock serves at most {MAX_NODES}: "
            "split the fleet into several ImageUnlocks with narrower node selectors"
        )
        counts = {"nodesReady": 0, "nodesDesired": len(desired), "readyNodes": f"0/{len(desired)}"}
        return Summary({**_stalled("TooManyNodes", message, generation, previous, now), **counts}, ())

    current = {n: entries[n] for n in desired if n in entries and entries[n].get("observedGeneration") == generation}
    ready = [n for n in desired if current.get(n, {}).get("phase") == Phase.READY.value]
    stalled = [n for n in desired if current.get(n, {}).get("phase") == Phase.FAILED.value]
    working = [n for n in desired if n not in ready and n not in stalled]
    counts = {"nodesReady": len(ready), "nodesDesired": len(desired), "readyNodes": f"{len(ready)}/{len(desired)}"}

    if not desired:
        message = (
            f"spec.nodeSelector selects none of the {len(nodes)} node(s) that run an agent"
            if nodes
            else "no node runs an ImageUnlock agent yet"
        )
        if nodes:
            result = _stalled("NoNodesSelected", message, generation, previous, now)
        else:
            result = _working(Phase.PENDING, "NoNodes", message, generation, previous, now)
        return Summary({**result, **counts}, prune)

    aggregate = _aggregate([entries[n] for n in desired if n in entries], len(desired), bool(working or stalled))
    if stalled:
        reason = current[stalled[0]].get("reason") or "UnlockFailed"
        details = "; ".join(f"node {n}: {current[n].get('message', '')}" for n in stalled[:NAMED])
        more = f" (and {len(stalled) - NAMED} more node(s))" if len(stalled) > NAMED else ""
        result = _stalled(reason, details + more, generation, previous, now)
        if working:  # kstatus: both may hold while other nodes still work
            result["conditions"] = _conditions(
                previous,
                generation,
                now,
                ready=(False, reason, result["message"]),
                reconciling=(True, "NodesWorking", f"still working on {_names(working)}"),
                stalled=(True, reason, result["message"]),
            )
        return Summary({**result, **aggregate, **counts}, prune)
    if working:
        # A node at work on a generation has not observed it yet (observedGeneration moves when
        # it finishes), so a working phase is shown whatever its entry's generation.
        busy = {n: entries[n] for n in working if n in entries and entries[n].get("phase") in _ORDER}
        phase = min((Phase(e["phase"]) for e in busy.values()), key=_ORDER.index, default=Phase.PENDING)
        if len(busy) < len(working):
            phase = Phase.PENDING  # a node that has not started is furthest behind
        leading = busy.get(working[0])
        reason = str(leading.get("reason") or leading["phase"]) if leading else phase.value
        waits = [_waiting(n, busy.get(n), n in entries) for n in working]
        message = f"{len(ready)}/{len(desired)} node(s) ready; waiting for {'; '.join(waits[:NAMED])}"
        if len(waits) > NAMED:
            message += f" and {len(waits) - NAMED} more"
        result = _working(phase, reason, message, generation, previous, now)
        if status.get("observedGeneration") != generation:
            result["images"] = None  # the last generation's: not this one's (kept while this one's)
        return Summary({**result, **aggregate, **counts}, prune)

    reasons = {current[n].get("reason") for n in ready}
    reason = "AlreadyPresent" if reasons == {"AlreadyPresent"} else "Unlocked"
    listed = [current[n]["images"] for n in ready if current[n].get("images")]
    # On a large fleet Ready entries hold only the digest of their list: the summary's list
    # stands while it is that list (an agent trusts it only then, see nodes.view).
    kept = [{"name": i.get("name"), "id": i.get("id")} for i in status.get("images") or []]
    digests = {current[n].get("imagesDigest") for n in ready} - {None}
    images = listed[0] if listed else (kept if kept and digests == {images_digest(kept)} else [])
    message = f"{len(images)} image(s) ready and verified on {len(ready)}/{len(desired)} node(s)"
    if differ := _disagreement({n: current[n] for n in ready}):
        # Every node verified its own archive, so each is usable; but no one list is the
        # cluster's truth: say which nodes differ, and list only the IDs all nodes share.
        reason, text, shared = differ
        message = f"{message}; {text}"
        images = [i for i in images if i.get("name") in shared]
    result = {
        "phase": Phase.READY.value,
        "message": message,
        "observedGeneration": generation,
        "images": [{"name": i["name"], "id": i["id"], "present": True} for i in images],
        "conditions": _conditions(
            previous,
            generation,
            now,
            ready=(True, reason, message),
            reconciling=(False, "Succeeded", ""),
            stalled=(False, "Succeeded", ""),
        ),
    }
    return Summary({**result, **aggregate, **counts}, prune)


def _disagreement(ready: Mapping[str, Mapping[str, Any]]) -> tuple[str, str, set[str]] | None:
    """``(reason, message, refs every node verified alike)`` when Ready nodes verified
    different image IDs for one ref (different archives under one version), else None."""
    seen: dict[str, dict[str, list[str]]] = {}  # ref -> id -> nodes
    for node, entry in ready.items():
        for image in entry.get("images") or ():
            seen.setdefault(str(image.get("name")), {}).setdefault(str(image.get("id")), []).append(node)
    split = {ref: ids for ref, ids in seen.items() if len(ids) > 1}
    # Entries that keep only the digest of their list (a large fleet) are compared by digest.
    groups: dict[str, list[str]] = {}
    for node, entry in ready.items():
        digest = entry.get("imagesDigest") or (images_digest(entry["images"]) if entry.get("images") else None)
        if digest:
            groups.setdefault(str(digest), []).append(node)
    if not split and len(groups) <= 1:
        return None
    if split:
        parts = [
            f"{ref}: " + ", ".join(f"{image_id[:19]}… on {_names(sorted(nodes))}" for image_id, nodes in ids.items())
            for ref, ids in sorted(split.items())
        ]
        text = "nodes verified different image IDs for " + "; ".join(parts[:NAMED])
        text += f" (and {len(parts) - NAMED} more ref(s))" if len(parts) > NAMED else ""
    else:
        text = "nodes verified different image lists: " + "; ".join(
            f"{_names(sorted(nodes))}" for nodes in list(groups.values())[:NAMED]
        )
    return "ImagesDiffer", text + ": check that every node has the same archive", set(seen) - set(split)


def _waiting(name: str, busy: Mapping[str, Any] | None, reported: bool) -> str:
    if busy is None:
        return f"{name} (updating from an earlier generation)" if reported else f"{name} (no report yet)"
    return f"{name} ({busy['phase']}: {busy.get('message', '')})"


def _aggregate(entries: Sequence[Mapping[str, Any]], desired: int, busy: bool) -> dict[str, Any]:
    """Times over the nodes (the oldest verification, the newest unlock, a re-check request
    once every node answered it) and the mean progress (a Ready node counts 100 %)."""
    verified = [e["lastVerifiedTime"] for e in entries if e.get("lastVerifiedTime")]
    unlocked = [e["lastUnlockTime"] for e in entries if e.get("lastUnlockTime")]
    handled = {e.get("lastHandledRequestedAt") for e in entries}
    percents = [
        100 if e.get("phase") == Phase.READY.value else int((e.get("progress") or {}).get("percent") or 0)
        for e in entries
    ]
    percent = sum(percents) // desired if busy else 100
    return {
        "lastVerifiedTime": min(verified) if len(verified) == desired else None,
        "lastUnlockTime": max(unlocked) if unlocked else None,
        "lastHandledRequestedAt": handled.pop() if len(handled) == 1 and len(entries) == desired else None,
        "progress": {"percent": percent, "text": f"{percent}%"},
    }


def _conditions(
    previous: Any,
    generation: int,
    now: str,
    *,
    ready: tuple[bool, str, str],
    reconciling: tuple[bool, str, str],
    stalled: tuple[bool, str, str],
) -> list[dict[str, Any]]:
    return st.conditions(previous, {st.READY: ready, st.RECONCILING: reconciling, st.STALLED: stalled}, generation, now)


def _working(phase: Phase, reason: str, message: str, generation: int, previous: Any, now: str) -> dict[str, Any]:
    return {
        "phase": phase.value,
        "message": message,
        "observedGeneration": generation,
        "conditions": _conditions(
            previous,
            generation,
            now,
            ready=(False, reason, message),
            reconciling=(True, reason, message),
            stalled=(False, reason, ""),
        ),
    }


def _stalled(reason: str, message: str, generation: int, previous: Any, now: str) -> dict[str, Any]:
    return {
        "phase": Phase.FAILED.value,
        "message": message,
        "observedGeneration": generation,
        "images": None,
        "progress": None,
        "conditions": _conditions(
            previous,
            generation,
            now,
            ready=(False, reason, message),
            reconciling=(False, reason, ""),
            stalled=(True, reason, message),
        ),
    }
