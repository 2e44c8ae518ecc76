"""When an agent reconciles an ImageUnlock on its node (framework-free; the agent's workers
call ``step`` from worker threads when the object changed or its next look is due; what this
node last reported on it, its entry, says where it stands: Reconciler.entry; ``step``
answers when to look next).

Level-triggered, like a controller's work queue: a generation this node has not finished
(its entry's ``observedGeneration`` differs) is reconciled at once; a Ready object is
re-verified every verify interval (and unlocked again when an image went missing, changed
or became contested); transient failures are retried exactly when the status says
("retrying in Ns"), with growing backoff; and a Stalled object is re-checked only when
something the failure depended on changed — generation, the Secret, the archive file, a
competing claim, or the ``loader.azaion.com/requested-at`` annotation — never on a timer, so
known-bad credentials are not replayed until the account locks.

No locks: the agent's work queue never hands one key to two workers at once, so the state
of a key is only touched by the one step (or ``forget``) running for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from imageunlock.agent.reconciler import REQUESTED_AT, Inputs, Outcome, Reconciler, Verdict
from imageunlock.engine.models import Phase
from imageunlock.errors import NodeDiskPressureError, UnlockError
from imageunlock.kube.models import NodeEntry

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str]  # (namespace, name)
# A check that found everything in place is recorded (lastVerifiedTime) at most this often,
# or at once when asked (requested-at): every status write goes to every watcher of every
# ImageUnlock, and on a fleet each node's write carries the whole object.
RECORD_VERIFIED = 3600.0
# Requested re-checks (requested-at) of one object are handled at most this often on a node:
# a later request waits for the rest of the interval (deferred, never dropped), so a script
# bumping the annotation cannot turn into a stream of unlock attempts on every node.
REQUEST_INTERVAL = 30.0
# A new generation is reconciled at once, unless this node started a reconcile of the object
# less than this long ago: then when the interval is up (the latest generation; none is
# lost). Edits in a loop then cost each node one unlock attempt per interval, not one each.
GENERATION_INTERVAL = 10.0


@dataclass(frozen=True)
class Due:
    at: float = 0.0  # monotonic time of the next look
    attempt: int = 0  # transient failures in a row (the backoff exponent)
    inputs: Inputs | None = None  # what a Stalled outcome depended on
    generation: Any = None  # the generation the last reconcile was for
    uid: Any = None  # of the object it was for: one created anew under the same name starts afresh
    requested: Any = None  # the requested-at value already acted on (acted on once, not every tick)
    asked: float = float("-inf")  # monotonic time a requested re-check was last acted on
    reason: str | None = None  # why a retry is scheduled (NodeDiskPressure: due as soon as it clears)


class Resync:
    def __init__(self, reconciler: Reconciler, clock: Callable[[], float] = time.monotonic) -> None:
        self.reconciler = reconciler
        self.clock = clock
        self.due: dict[ObjectKey, Due] = {}
        self._started: dict[ObjectKey, float] = {}  # when a reconcile of the object last began
        # Objects whose credentials Secret changed since their last step (set from the event
        # loop, taken by the step: the one place with a lock).
        self._poked: set[ObjectKey] = set()
        self._poke_lock = threading.Lock()

    def poke(self, key: ObjectKey) -> None:
        """The credentials Secret ``key`` names changed: a Stalled (or retrying) object is
        re-checked at its next step instead of at the interval (a Ready one is not: nothing
        needs the Secret while the images are in place)."""
        with self._poke_lock:
            self._poked.add(key)

    def _take_poke(self, key: ObjectKey) -> bool:
        with self._poke_lock:
            if key in self._poked:
                self._poked.discard(key)
                return True
            return False

    @property
    def interval(self) -> float:
        return self.reconciler.settings.verify_interval

    def forget(self, key: ObjectKey) -> None:
        self.due.pop(key, None)
        self._started.pop(key, None)
        self._take_poke(key)

    def record(self, key: ObjectKey, outcome: Outcome, attempt: int, inputs: Inputs | None, generation: Any) -> None:
        """Schedule the next look after a reconcile."""
        now = self.clock()
        if outcome.verdict is Verdict.RETRY:
            self.due[key] = Due(now + outcome.delay, attempt + 1, None, generation, reason=outcome.reason)
        elif outcome.verdict is Verdict.STALLED:
            self.due[key] = Due(now + self.interval, 0, inputs, generation)
        else:
            self.due[key] = Due(now + self.interval, 0, None, generation)

    def step(self, key: ObjectKey, body: Mapping[str, Any]) -> float:
        """Reconcile or re-check ``key`` if that is due; the seconds until its next look."""
        meta = body.get("metadata") or {}
        generation, uid = meta.get("generation"), meta.get("uid")
        due = self.due.get(key, Due())
        if due.uid is not None and due.uid != uid:
            due = Due()  # another object of the same name: nothing of the old one applies
        entry = self.reconciler.entry(body)
        request = _requested(body, entry)
        now = self.clock()
        poked = self._take_poke(key) and (due.inputs is not None or due.attempt > 0)  # Stalled or retrying
        if entry.observed_generation != generation and due.generation != generation:
            if now < (started := self._started.get(key, float("-inf"))) + GENERATION_INTERVAL:
                return started + GENERATION_INTERVAL - now  # edits in quick succession: the latest then
            due = Due(generation=generation, asked=due.asked)  # a new generation: now, whatever was scheduled
        elif now < due.at and not poked and not self._pressure_cleared(due):
            if request is None or request == due.requested:
                return due.at - now  # not due; a pending request is acted on once, then the schedule holds
            if now < due.asked + REQUEST_INTERVAL:
                # a request too soon after the last one: deferred to the interval's end
                return min(due.at, due.asked + REQUEST_INTERVAL) - now
        self._step(key, body, entry, due)
        asked = now if request is not None and request != due.requested else due.asked
        self.due[key] = replace(self.due[key], uid=uid, requested=request or due.requested, asked=asked)
        return self.due[key].at - self.clock()

    def _pressure_cleared(self, due: Due) -> bool:
        """A retry held back by DiskPressure is due the moment the condition clears (the
        agent's Node watch queues every object when the Node changes), not at its backoff."""
        return due.reason == NodeDiskPressureError.reason and not self.reconciler.disk_pressure()

    def _step(self, key: ObjectKey, body: Mapping[str, Any], entry: NodeEntry, due: Due) -> None:
        generation = (body.get("metadata") or {}).get("generation")
        phase = entry.phase if entry.observed_generation == generation else None
        try:
            if phase is Phase.READY and self.reconciler.still_ready(body):
                if _requested(body, entry) is not None or _older_than(entry.last_verified_time, RECORD_VERIFIED):
                    self.reconciler.verified(body)  # lastVerifiedTime, and the request it answered
                self.due[key] = Due(self.clock() + self.interval, 0, None, generation)
                return
            inputs = self.reconciler.inputs(body)  # read before the reconcile, so a change during it counts
        except UnlockError as exc:  # the runtime or the API server is down: look again later
            log.info("re-verification of %s/%s postponed: %s", *key, exc.message)
            self.due[key] = Due(self.clock() + min(self.interval, 30.0), due.attempt, due.inputs, due.generation)
            return
        if phase is Phase.FAILED and not inputs.changed(due.inputs, entry.reason):
            self.due[key] = Due(self.clock() + self.interval, 0, due.inputs, generation)
            return  # nothing it depends on changed: a re-check would fail the same way
        if phase is Phase.READY:
            log.info("images of %s/%s changed, went missing or are contested: unlocking again", *key)
        # A new generation, Ready but no longer true, Stalled with changed inputs, or a retry fell due.
        self._started[key] = self.clock()
        outcome = self.reconciler.reconcile(body, attempt=due.attempt)
        self.record(key, outcome, due.attempt, inputs, generation)


def _older_than(timestamp: Any, seconds: float) -> bool:
    """Whether an RFC 3339 time is missing, unreadable or more than ``seconds`` old."""
    try:
        then = datetime.fromisoformat(str(timestamp).replace("Z", "+00:00"))
    except ValueError:
        return True
    return (datetime.now(UTC) - then).total_seconds() > seconds


def _requested(body: Mapping[str, Any], entry: NodeEntry) -> str | None:
    """The requested-at value of a re-check asked for and not yet recorded as handled."""
    requested = ((body.get("metadata") or {}).get("annotations") or {}).get(REQUESTED_AT)
    if requested is None or requested == entry.last_handled_requested_at:
        return None
    return str(requested)
