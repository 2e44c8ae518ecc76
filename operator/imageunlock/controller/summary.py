"""The cluster summary of one ImageUnlock (pure): kstatus conditions, phase, ``NODES``
(ready/desired) and the aggregate fields, computed by the controller from the per-node
entries the agents wrote and the Nodes the ImageUnlock selects.

Ready only when every selected node has a Ready entry for the current generation: ``kubectl
wait --for=condition=Ready`` means "usable everywhere it should be". Stalled as soon as one
selected node is stuck on a user mistake (the message names it), Reconciling while any
selected node still works or has not reported.

A chain of small rules over one :class:`Fleet` (the entries against the selected nodes); the
first that applies writes the summary, with the condition helpers the agent uses for its
entry (kube/conditions.py):

    TooManyNodes → InvalidSelector → NoNodes → AnyStalled → Working → Ready
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from imageunlock.engine.models import Phase
from imageunlock.errors import ConfigurationError
from imageunlock.kube import conditions as st
from imageunlock.kube.models import Image, ImageUnlockStatus, NodeEntry, StatusImage, SummaryProgress
from imageunlock.kube.nodes import MAX_NODES, NodeInfo, Placement, images_digest, parse_selector

# Least advanced first: the summary of nodes still working shows the one furthest behind.
_ORDER = [Phase.PENDING, Phase.AUTHENTICATING, Phase.FETCHING_KEY, Phase.LOADING, Phase.VERIFYING]
NAMED = 3  # nodes named in a message before "and N more"


@dataclass(frozen=True)
class Summary:
    status: dict[str, Any]  # the top-level fields as a merge patch (None removes one; never status.nodes)
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


@dataclass(frozen=True)
class Fleet:
    """What the rules read: one ImageUnlock's entries against the nodes it selects."""

    generation: int
    status: ImageUnlockStatus  # as the object holds it
    entries: Mapping[str, NodeEntry]  # by node name
    known: int  # the Nodes the controller knows
    desired: tuple[str, ...]  # the selected nodes that run an agent (none for an invalid selector)
    invalid: ConfigurationError | None  # spec.nodeSelector's problem
    now: str

    @cached_property
    def current(self) -> dict[str, NodeEntry]:
        """Entries of selected nodes for this generation."""
        return {
            n: self.entries[n]
            for n in self.desired
            if n in self.entries and self.entries[n].observed_generation == self.generation
        }

    def _at(self, phase: Phase) -> list[str]:
        return [n for n in self.desired if n in self.current and self.current[n].phase is phase]

    @cached_property
    def ready(self) -> list[str]:
        return self._at(Phase.READY)

    @cached_property
    def stalled(self) -> list[str]:
        return self._at(Phase.FAILED)

    @cached_property
    def working(self) -> list[str]:
        return [n for n in self.desired if n not in self.ready and n not in self.stalled]

    @property
    def prune(self) -> tuple[str, ...]:
        """Entries of nodes not selected: every one for an invalid selector (the agents select
        nothing either), none past MAX_NODES (the agents write none then)."""
        if len(self.desired) > MAX_NODES:
            return ()
        return tuple(sorted(name for name in self.entries if name not in self.desired))

    def start(self) -> ImageUnlockStatus:
        """An empty summary that knows the conditions as they are (for their transition times)."""
        return ImageUnlockStatus(conditions=self.status.conditions)

    def counts(self, ready: int | None = None) -> dict[str, Any]:
        ready = len(self.ready) if ready is None else ready
        return {"nodes_ready": ready, "nodes_desired": len(self.desired), "ready_nodes": f"{ready}/{len(self.desired)}"}

    def aggregate(self) -> dict[str, Any]:
        """Times over the nodes (the oldest verification, the newest unlock, a re-check request
        once every node answered it) and the mean progress (a Ready node counts 100 %)."""
        entries = [self.entries[n] for n in self.desired if n in self.entries]
        desired = len(self.desired)
        verified = [e.last_verified_time for e in entries if e.last_verified_time]
        unlocked = [e.last_unlock_time for e in entries if e.last_unlock_time]
        handled = {e.last_handled_requested_at for e in entries}
        if self.working or self.stalled:
            percents = [
                100 if e.phase is Phase.READY else int((e.progress and e.progress.percent) or 0) for e in entries
            ]
            percent = sum(percents) // desired
        else:
            percent = 100
        return {
            "last_verified_time": min(verified) if len(verified) == desired else None,
            "last_unlock_time": max(unlocked) if unlocked else None,
            "last_handled_requested_at": handled.pop() if len(handled) == 1 and len(entries) == desired else None,
            "progress": SummaryProgress(percent=percent, text=f"{percent}%"),
        }


def fleet(body: Mapping[str, Any], nodes: Sequence[NodeInfo], placement: Placement, now: str) -> Fleet:
    generation = int((body.get("metadata") or {}).get("generation") or 0)
    status = ImageUnlockStatus.model_validate(dict(body.get("status") or {}))
    entries = {e.name: e for e in status.nodes if e.name}
    # An agent beyond the placement counts while it reports on this generation or works on it
    # (its entry at an older generation, not working, is a leftover: pruned).
    reporting = {n for n, e in entries.items() if e.observed_generation == generation or e.phase in _ORDER}
    try:
        desired, invalid = tuple(desired_nodes(body.get("spec") or {}, nodes, placement, reporting)), None
    except ConfigurationError as exc:  # a bad spec.nodeSelector: the agents select nothing either
        desired, invalid = (), exc
    return Fleet(generation, status, entries, len(nodes), desired, invalid, now)


Rule = Callable[[Fleet], ImageUnlockStatus | None]  # the summary, or None: not this rule's case


def too_many_nodes(f: Fleet) -> ImageUnlockStatus | None:
    """Past MAX_NODES the agents write no entry (object size: README, "Scale")."""
    if len(f.desired) <= MAX_NODES:
        return None
    message = (
        f"spec.nodeSelector selects {len(f.desired)} nodes; one ImageUnlock serves at most {MAX_NODES}: "
        "split the fleet into several ImageUnlocks with narrower node selectors"
    )
    stalled = st.mark_stalled(f.start(), "TooManyNodes", message, f.generation, f.now)
    return stalled.model_copy(update=f.counts(ready=0))


def invalid_selector(f: Fleet) -> ImageUnlockStatus | None:
    if f.invalid is None:
        return None
    return st.mark_stalled(f.start(), f.invalid.reason, f.invalid.message, f.generation, f.now)


def no_nodes(f: Fleet) -> ImageUnlockStatus | None:
    """No node to wait for: a selector that matches none is a mistake; no agent yet, a wait."""
    if f.desired:
        return None
    if f.known:
        message = f"spec.nodeSelector selects none of the {f.known} node(s) that run an agent"
        result = st.mark_stalled(f.start(), "NoNodesSelected", message, f.generation, f.now)
    else:
        message = "no node runs an ImageUnlock agent yet"
        result = st.mark_reconciling(f.start(), Phase.PENDING, "NoNodes", message, f.generation, f.now)
    return result.model_copy(update=f.counts())


def any_stalled(f: Fleet) -> ImageUnlockStatus | None:
    """One stuck node stalls the whole; the message names the first few."""
    if not f.stalled:
        return None
    reason = f.current[f.stalled[0]].reason or "UnlockFailed"
    message = "; ".join(f"node {n}: {f.current[n].message or ''}" for n in f.stalled[:NAMED])
    if len(f.stalled) > NAMED:
        message += f" (and {len(f.stalled) - NAMED} more node(s))"
    # kstatus: Stalled and Reconciling may both hold while other nodes still work
    still = f"still working on {_names(f.working)}" if f.working else ""
    stalled = st.mark_stalled(f.start(), reason, message, f.generation, f.now, still_working=still)
    return stalled.model_copy(update={**f.aggregate(), **f.counts()})


def working(f: Fleet) -> ImageUnlockStatus | None:
    """Nodes at work or not reported yet: the phase of the one furthest behind."""
    if not f.working:
        return None
    # A node at work on a generation has not observed it yet (observedGeneration moves when
    # it finishes), so a working phase is shown whatever its entry's generation.
    busy = {n: e for n in f.working if (e := f.entries.get(n)) is not None and e.phase in _ORDER}
    phase = min((e.phase for e in busy.values() if e.phase), key=_ORDER.index, default=Phase.PENDING)
    if len(busy) < len(f.working):
        phase = Phase.PENDING  # a node that has not started is furthest behind
    leading = busy.get(f.working[0])
    reason = (leading.reason or str(leading.phase)) if leading else phase.value
    waits = [_waiting(n, busy.get(n), n in f.entries) for n in f.working]
    message = f"{len(f.ready)}/{len(f.desired)} node(s) ready; waiting for {'; '.join(waits[:NAMED])}"
    if len(waits) > NAMED:
        message += f" and {len(waits) - NAMED} more"
    result = st.mark_reconciling(f.start(), phase, reason, message, f.generation, f.now)
    if f.status.observed_generation != f.generation:
        result = result.model_copy(update={"images": None})  # the last generation's (kept while this one's)
    return result.model_copy(update={**f.aggregate(), **f.counts()})


def ready(f: Fleet) -> ImageUnlockStatus:
    """Every selected node is Ready for this generation (what is left: the last rule)."""
    entries = {n: f.current[n] for n in f.ready}
    reason = "AlreadyPresent" if {e.reason for e in entries.values()} == {"AlreadyPresent"} else "Unlocked"
    images = _images(f)
    message = f"{len(images)} image(s) ready and verified on {len(f.ready)}/{len(f.desired)} node(s)"
    if differ := _disagreement(entries):
        # Every node verified its own archive, so each is usable; but no one list is the
        # cluster's truth: say which nodes differ, and list only the IDs all nodes share.
        reason, text, shared = differ
        message = f"{message}; {text}"
        images = [i for i in images if i.name in shared]
    done = st.mark_ready(f.start(), reason, message, f.generation, f.now)
    listed = [StatusImage(name=i.name, id=i.id, present=True) for i in images]
    return done.model_copy(update={"images": listed, **f.aggregate(), **f.counts()})


RULES: tuple[Rule, ...] = (too_many_nodes, invalid_selector, no_nodes, any_stalled, working, ready)


def summarize(
    body: Mapping[str, Any], nodes: Sequence[NodeInfo], placement: Placement, now: str | None = None
) -> Summary:
    f = fleet(body, nodes, placement, now or st.now_rfc3339())
    status = next(s for rule in RULES if (s := rule(f)) is not None)  # the last rule always applies
    return Summary(status.model_dump(by_alias=True, exclude_unset=True, exclude={"nodes"}, mode="json"), f.prune)


def _images(f: Fleet) -> list[Image]:
    """The list the Ready nodes verified. On a large fleet Ready entries hold only the digest
    of their list: the summary's list stands while it is that list (an agent trusts it only
    then, see nodes.find_entry)."""
    listed = [e.images for n in f.ready if (e := f.current[n]).images]
    if listed:
        return listed[0]
    kept = [Image(name=i.name, id=i.id) for i in f.status.images or ()]
    digests = {f.current[n].images_digest for n in f.ready} - {None}
    return kept if kept and digests == {images_digest(kept)} else []


def _disagreement(ready: Mapping[str, NodeEntry]) -> tuple[str, str, set[str]] | None:
    """``(reason, message, refs every node verified alike)`` when Ready nodes verified
    different image IDs for one ref (different archives under one version), else None."""
    seen: dict[str, dict[str, list[str]]] = {}  # ref -> id -> nodes
    for node, entry in ready.items():
        for image in entry.images or ():
            seen.setdefault(image.name, {}).setdefault(image.id, []).append(node)
    split = {ref: ids for ref, ids in seen.items() if len(ids) > 1}
    # Entries that keep only the digest of their list (a large fleet) are compared by digest.
    groups: dict[str, list[str]] = {}
    for node, entry in ready.items():
        digest = entry.images_digest or (images_digest(entry.images) if entry.images else None)
        if digest:
            groups.setdefault(digest, []).append(node)
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


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(items[:NAMED])
    return shown + (f" and {len(items) - NAMED} more" if len(items) > NAMED else "")


def _waiting(name: str, busy: NodeEntry | None, reported: bool) -> str:
    if busy is None:
        return f"{name} (updating from an earlier generation)" if reported else f"{name} (no report yet)"
    return f"{name} ({busy.phase}: {busy.message or ''})"
