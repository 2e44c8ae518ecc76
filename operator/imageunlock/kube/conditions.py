"""kstatus (pure): the three states an ImageUnlock, or one node of it, can be in, set on the
controller's summary and on a node's entry by the same three helpers.

kstatus (sigs.k8s.io/cli-utils) reads ``observedGeneration`` and the abnormal-true
conditions ``Reconciling`` and ``Stalled``; ``kubectl wait --for=condition=Ready`` and Argo
CD / Flux read ``Ready``. On the summary every mark writes all three conditions, each with
the generation it was set for, and a condition's ``lastTransitionTime`` only moves when its
``status`` changes. A node's entry keeps no conditions (object size: README, "Scale"): its
phase says which one holds and its ``reason`` why; it claims a generation (observedGeneration)
only once it finished it, Ready or Stalled.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar

from imageunlock.engine.models import Phase
from imageunlock.kube.models import Condition, ImageUnlockStatus, NodeEntry

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"
State = tuple[bool, str, str]  # a condition: holds, reason, message
Status = TypeVar("Status", NodeEntry, ImageUnlockStatus)


def now_rfc3339() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def mark_ready(status: Status, reason: str, message: str, generation: int, now: str | None = None) -> Status:
    """Done: everything holds for ``generation``."""
    return _mark(
        status,
        Phase.READY,
        generation,
        now,
        ready=(True, reason, message),
        reconciling=(False, "Succeeded", ""),
        stalled=(False, "Succeeded", ""),
    )


def mark_stalled(
    status: Status, reason: str, message: str, generation: int, now: str | None = None, still_working: str = ""
) -> Status:
    """A mistake to fix: nothing changes until the spec, a Secret or an archive does. What was
    verified no longer holds for this generation: images and progress are cleared.
    ``still_working`` (the summary only: other nodes still work) keeps Reconciling true with
    that message, as kstatus allows."""
    reconciling = (True, "NodesWorking", still_working) if still_working else (False, reason, "")
    marked = _mark(
        status,
        Phase.FAILED,
        generation,
        now,
        ready=(False, reason, message),
        reconciling=reconciling,
        stalled=(True, reason, message),
    )
    if isinstance(marked, NodeEntry):
        return marked.model_copy(update={"images": None, "images_digest": None, "progress": None})
    return marked.model_copy(update={"images": None, "progress": None})


def mark_reconciling(
    status: Status, phase: Phase, reason: str, message: str, generation: int, now: str | None = None
) -> Status:
    """At work (``phase``), or waiting to retry a transient fault (``reason``, ``message``)."""
    return _mark(
        status,
        phase,
        generation,
        now,
        ready=(False, reason, message),
        reconciling=(True, reason, message),
        stalled=(False, reason, ""),
    )


def _mark(
    status: Status,
    phase: Phase,
    generation: int,
    now: str | None,
    *,
    ready: State,
    reconciling: State,
    stalled: State,
) -> Status:
    states = {READY: ready, RECONCILING: reconciling, STALLED: stalled}
    holding = next(state for type_ in (STALLED, READY, RECONCILING) if (state := states[type_])[0])
    if isinstance(status, NodeEntry):
        finished = {"observed_generation": generation} if phase in (Phase.READY, Phase.FAILED) else {}
        return status.model_copy(update={"phase": phase, "reason": holding[1], "message": holding[2], **finished})
    return status.model_copy(
        update={
            "phase": phase,
            "message": holding[2],
            "observed_generation": generation,
            "conditions": _conditions(status.conditions, states, generation, now or now_rfc3339()),
        }
    )


def _conditions(
    previous: Sequence[Condition], states: Mapping[str, State], generation: int, now: str
) -> list[Condition]:
    before = {c.type: c for c in previous}
    result = []
    for type_, (holds, reason, message) in states.items():
        status: Literal["True", "False"] = "True" if holds else "False"
        old = before.get(type_)
        since = now if old is None or old.status != status else old.last_transition_time or now
        result.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                observed_generation=generation,
                last_transition_time=since,
            )
        )
    return result


def holding_reason(conditions: object) -> str | None:
    """The reason of the condition that holds: Stalled, then Ready, then Reconciling."""
    if not isinstance(conditions, Sequence):
        return None
    by_type = {c.get("type"): c for c in conditions if isinstance(c, Mapping)}
    for kind in (STALLED, READY, RECONCILING):
        if (c := by_type.get(kind)) and c.get("status") == "True":
            return str(c.get("reason") or "")
    return None


def condition_states(entry: NodeEntry) -> dict[str, str]:
    """The conditions a node's entry stands for (``True``/``False``; ``Unknown`` before the
    node reported a phase)."""
    if entry.phase is None:
        return dict.fromkeys((READY, RECONCILING, STALLED), "Unknown")
    finished = entry.phase in (Phase.READY, Phase.FAILED)
    holds = {READY: entry.phase is Phase.READY, STALLED: entry.phase is Phase.FAILED, RECONCILING: not finished}
    return {type_: str(value) for type_, value in holds.items()}


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff for transient faults: base, 2·base, 4·base, … up to cap."""
    return min(cap, base * 2.0 ** max(0, attempt))


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """The delay of a retry: uniform over [0, backoff(attempt, base, cap)] ("full jitter").
    Nodes that failed together (a resource API outage, a runtime restart on a fleet) then
    come back spread over the whole window instead of in lock-step, while the ceiling still
    doubles per attempt and never passes ``cap``."""
    return (rng or _RNG).uniform(0.0, backoff(attempt, base, cap))


_RNG = random.Random()


@dataclass
class Throttle:
    """Let a progress update through on a phase change or once per ``interval`` seconds."""

    interval: float
    clock: Callable[[], float] = time.monotonic
    _last: float = field(default=float("-inf"))
    _phase: object = None

    def ready(self, phase: object, final: bool = False) -> bool:
        now = self.clock()
        if phase != self._phase or final or now - self._last >= self.interval:
            self._phase, self._last = phase, now
            return True
        return False
