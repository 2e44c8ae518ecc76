"""Re-verification of settled ImageUnlocks (framework-free; the kopf layer calls ``step``
from one worker thread for every known object, about once a second).

Who acts on an object:

* kopf's handler, until it has finished the current generation (``status.observedGeneration
  == metadata.generation``): kopf retries its transient failures itself;
* this module, from then on. It re-verifies a Ready object every verify interval (and
  unlocks again when an image went missing, changed or became contested); it retries its own
  transient failures exactly when the status it wrote says ("retrying in Ns"), with growing
  backoff; and it re-checks a Stalled object only when something the failure depended on
  changed — generation, the Secret, the archive file, a competing claim, or the
  ``loader.azaion.com/requested-at`` annotation — never on a timer, so known-bad credentials
  are not replayed until the account locks.

A per-object lock keeps the handler and this module from reconciling one object at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UnlockError
from .models import Phase
from .reconciler import REQUESTED_AT, Inputs, Outcome, Reconciler, Verdict

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class Due:
    at: float = 0.0  # monotonic time of the next look
    attempt: int = 0  # transient failures in a row (the backoff exponent)
    inputs: Inputs | None = None  # what a Stalled outcome depended on


class Resync:
    def __init__(self, reconciler: Reconciler, clock: Callable[[], float] = time.monotonic) -> None:
        self.reconciler = reconciler
        self.clock = clock
        self.due: dict[ObjectKey, Due] = {}
        self._locks: dict[ObjectKey, threading.Lock] = {}
        self._guard = threading.Lock()

    @property
    def interval(self) -> float:
        return self.reconciler.settings.verify_interval

    def lock(self, key: ObjectKey) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def forget(self, key: ObjectKey) -> None:
        with self._guard:
            self._locks.pop(key, None)
            self.due.pop(key, None)

    def record(
        self, key: ObjectKey, outcome: Outcome, attempt: int, inputs: Inputs | None, by_handler: bool = False
    ) -> None:
        """Schedule the next look after a reconcile (by the handler or by ``step``)."""
        now = self.clock()
        if outcome.verdict is Verdict.RETRY and by_handler:
            self.due[key] = Due(float("inf"))  # kopf retries it; its final outcome is recorded here
        elif outcome.verdict is Verdict.RETRY:
            self.due[key] = Due(now + outcome.delay, attempt + 1)
        elif outcome.verdict is Verdict.STALLED:
            self.due[key] = Due(now + self.interval, 0, inputs)
        else:
            self.due[key] = Due(now + self.interval)

    def step(self, key: ObjectKey, body: Mapping[str, Any]) -> None:
        due = self.due.get(key, Due())
        if self.clock() < due.at and not _requested(body):
            return
        lock = self.lock(key)
        if not lock.acquire(blocking=False):
            return  # the handler is reconciling it right now
        try:
            self._step(key, body, due)
        finally:
            lock.release()

    def _step(self, key: ObjectKey, body: Mapping[str, Any], due: Due) -> None:
        status = body.get("status") or {}
        meta = body.get("metadata") or {}
        if status.get("observedGeneration") != meta.get("generation"):
            return  # kopf's handler owns a generation it has not finished
        phase = status.get("phase")
        try:
            if phase == Phase.READY.value and self.reconciler.still_ready(body):
                self.reconciler.verified(body)  # lastVerifiedTime, and the request it answered
                self.due[key] = Due(self.clock() + self.interval)
                return
            inputs = self.reconciler.inputs(body)  # read before the reconcile, so a change during it counts
        except UnlockError as exc:  # the runtime or the API server is down: look again later
            log.info("re-verification of %s/%s postponed: %s", *key, exc.message)
            self.due[key] = Due(self.clock() + self.interval, due.attempt, due.inputs)
            return
        if phase == Phase.FAILED.value and not inputs.changed(due.inputs, _stalled_reason(status)):
            self.due[key] = Due(self.clock() + self.interval, 0, due.inputs)
            return  # nothing it depends on changed: a re-check would fail the same way
        if phase == Phase.READY.value:
            log.info("images of %s/%s changed, went missing or are contested: unlocking again", *key)
        # Ready but no longer true, Stalled with changed inputs, or our own retry fell due.
        outcome = self.reconciler.reconcile(body, attempt=due.attempt)
        self.record(key, outcome, due.attempt, inputs)

    def inputs(self, body: Mapping[str, Any]) -> Inputs | None:
        """``Reconciler.inputs``, or None when they cannot be read now (then the next look
        re-checks once)."""
        try:
            return self.reconciler.inputs(body)
        except UnlockError:
            return None


def _requested(body: Mapping[str, Any]) -> bool:
    """A re-check was asked for (the requested-at annotation has a value not yet handled)."""
    requested = ((body.get("metadata") or {}).get("annotations") or {}).get(REQUESTED_AT)
    return requested is not None and requested != (body.get("status") or {}).get("lastHandledRequestedAt")


def _stalled_reason(status: Mapping[str, Any]) -> str | None:
    conditions = status.get("conditions") or []
    return next((c.get("reason") for c in conditions if isinstance(c, Mapping) and c.get("type") == "Stalled"), None)
