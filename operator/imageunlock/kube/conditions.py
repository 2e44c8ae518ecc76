"""Building ImageUnlock ``status`` (pure): kstatus-compliant conditions plus a phase.

kstatus (sigs.k8s.io/cli-utils) reads ``observedGeneration`` and the abnormal-true
conditions ``Reconciling`` and ``Stalled``; ``kubectl wait --for=condition=Ready`` and Argo
CD / Flux read ``Ready``. Every status written carries all three conditions, and a
condition's ``lastTransitionTime`` only moves when its ``status`` changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from imageunlock.engine.models import Phase

READY, RECONCILING, STALLED = "Ready", "Reconciling", "Stalled"


def now_rfc3339() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def conditions(
    previous: Sequence[Mapping[str, Any]] | None,
    states: Mapping[str, tuple[bool, str, str]],
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    before = {c.get("type"): c for c in previous or () if isinstance(c, Mapping)}
    result = []
    for type_, (state, reason, message) in states.items():
        status = "True" if state else "False"
        old = before.get(type_)
        since = now if old is None or old.get("status") != status else old.get("lastTransitionTime", now)
        result.append(
            {
                "type": type_,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": since,
            }
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


def progress(done: int, total: int) -> dict[str, int | str]:
    percent = min(100, done * 100 // total) if total else 0
    return {"bytesDone": done, "bytesTotal": total, "percent": percent, "text": f"{percent}%"}


def working(
    phase: Phase,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]] | None,
    done: int = 0,
    total: int = 0,
    now: str | None = None,
) -> dict[str, Any]:
    """An unlock is under way: Reconciling=True, Ready=False."""
    now = now or now_rfc3339()
    return {
        "phase": phase.value,
        "message": message,
        "progress": progress(done, total),
        "conditions": conditions(
            previous,
            {
                READY: (False, "Reconciling", message),
                RECONCILING: (True, phase.value, message),
                STALLED: (False, "Reconciling", ""),
            },
            generation,
            now,
        ),
    }


def ready(
    images: Mapping[str, str],
    fast_path: bool,
    generation: int,
    previous: Sequence[Mapping[str, Any]] | None,
    bytes_total: int = 0,
    now: str | None = None,
    unlocked_at: str | None = None,
) -> dict[str, Any]:
    now = now or now_rfc3339()
    how = "already present" if fast_path else "loaded"
    message = f"{len(images)} image(s) {how} and verified"
    status: dict[str, Any] = {
        "phase": Phase.READY.value,
        "message": message,
        "observedGeneration": generation,
        "images": [{"name": ref, "id": image_id, "present": True} for ref, image_id in images.items()],
        "progress": progress(bytes_total, bytes_total) if bytes_total else progress(1, 1),
        "conditions": conditions(
            previous,
            {
                READY: (True, "AlreadyPresent" if fast_path else "Unlocked", message),
                RECONCILING: (False, "Succeeded", ""),
                STALLED: (False, "Succeeded", ""),
            },
            generation,
            now,
        ),
    }
    if unlocked_at:
        status["lastUnlockTime"] = unlocked_at
    return status


def stalled(
    reason: str,
    message: str,
    generation: int,
    previous: Sequence[Mapping[str, Any]] | None,
    images: Mapping[str, str | None] | None = None,
    now: str | None = None,
) -> dict[str, Any]:
    """A user error: nothing will change until the spec, Secret or archive does."""
    now = now or now_rfc3339()
    status: dict[str, Any] = {
        "phase": Phase.FAILED.value,
        "message": message,
        "observedGeneration": generation,
        "conditions": conditions(
            previous,
            {READY: (False, reason, message), RECONCILING: (False, reason, ""), STALLED: (True, reason, message)},
            generation,
            now,
        ),
    }
    # Status is merge-patched: a key left out would keep the last generation's value (its
    # images listed as present), so what does not hold for this generation is nulled.
    status["progress"] = None
    status["images"] = (
        None
        if images is None
        else [{"name": ref, "id": image_id or "", "present": image_id is not None} for ref, image_id in images.items()]
    )
    return status


def retrying(
    reason: str,
    message: str,
    attempt: int,
    delay: float,
    generation: int,
    previous: Sequence[Mapping[str, Any]] | None,
    phase: str = Phase.PENDING.value,
    now: str | None = None,
) -> dict[str, Any]:
    """A transient fault: still Reconciling, with the attempt and the next try in the message."""
    now = now or now_rfc3339()
    text = f"attempt {attempt} failed: {message}; retrying in {delay:.0f}s"
    return {
        "phase": phase,
        "message": text,
        "conditions": conditions(
            previous,
            {READY: (False, reason, text), RECONCILING: (True, reason, text), STALLED: (False, reason, "")},
            generation,
            now,
        ),
    }


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff for transient faults: base, 2·base, 4·base, … up to cap."""
    return min(cap, base * 2.0 ** max(0, attempt))


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
