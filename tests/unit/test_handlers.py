"""The kopf handlers' own logic, without a running kopf: how an Outcome becomes a return, a
kopf.PermanentError or a kopf.TemporaryError, what is recorded in Resync, and the snapshots
track_objects keeps. The memo holds a fake reconciler and a real Resync on a fake clock."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from imageunlock import handlers
from imageunlock.reconciler import Outcome, Verdict
from imageunlock.resync import Resync

KEY = ("ns", "iu")
INTERVAL = 300.0


class FakeReconciler:
    """Answers each reconcile with the next scripted Outcome; records what it was given."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.settings = SimpleNamespace(verify_interval=INTERVAL)
        self.outcomes = list(outcomes)
        self.calls: list[tuple[dict[str, Any], int]] = []  # (body, attempt)
        self.current_inputs: tuple[Any, ...] = ("generation", 1, "secret-v1")
        self.held_lock_while_reconciling: bool | None = None
        self.lock_of: threading.Lock | None = None

    def reconcile(self, body: dict[str, Any], attempt: int = 0) -> Outcome:
        self.calls.append((body, attempt))
        if self.lock_of is not None:
            self.held_lock_while_reconciling = self.lock_of.locked()
        self.current_inputs = ("generation", 1, "secret-v2")  # something changes meanwhile
        return self.outcomes.pop(0)

    def inputs(self, body: dict[str, Any]) -> tuple[Any, ...]:
        return self.current_inputs


def raw(phase: str | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "loader.azaion.com/v1alpha1",
        "kind": "ImageUnlock",
        "metadata": {"namespace": KEY[0], "name": KEY[1], "generation": 1, **meta},
        "spec": {"version": "2.0"},
        "status": {"phase": phase} if phase else {},
    }


def memo_with(*outcomes: Outcome) -> SimpleNamespace:
    reconciler = FakeReconciler(*outcomes)
    return SimpleNamespace(reconciler=reconciler, resync=Resync(reconciler, clock=lambda: 1000.0), objects={})


def handle(memo: SimpleNamespace, retry: int = 0, body: dict[str, Any] | None = None) -> object:
    return handlers.reconcile(body=kopf.Body(body or raw()), memo=memo, retry=retry)


def test_ready_returns_and_hands_the_object_to_reverification():
    memo = memo_with(Outcome(Verdict.READY, "ready"))
    assert handle(memo) is None
    assert memo.resync.due[KEY].at == 1000.0 + INTERVAL


def test_stalled_raises_a_permanent_error_and_keeps_the_inputs_read_before_the_reconcile():
    memo = memo_with(Outcome(Verdict.STALLED, "the resource API refused the credentials", "AuthenticationFailed"))
    with pytest.raises(kopf.PermanentError, match=r"^AuthenticationFailed: the resource API refused"):
        handle(memo)
    due = memo.resync.due[KEY]
    # a change during the reconcile must still trigger a re-check: the earlier inputs are kept
    assert due.inputs == ("generation", 1, "secret-v1") and due.at == 1000.0 + INTERVAL


def test_retry_raises_a_temporary_error_with_the_outcomes_delay_and_leaves_retries_to_kopf():
    memo = memo_with(Outcome(Verdict.RETRY, "Docker Engine is not reachable", "RuntimeUnavailable", 20.0))
    with pytest.raises(kopf.TemporaryError, match=r"^RuntimeUnavailable: Docker Engine") as caught:
        handle(memo, retry=2)
    assert caught.value.delay == 20.0
    assert memo.resync.due[KEY].at == float("inf")  # Resync does not race kopf's own retry


def test_kopfs_retry_count_is_the_reconcile_attempt():
    memo = memo_with(Outcome(Verdict.READY), Outcome(Verdict.READY))
    handle(memo, retry=0)
    handle(memo, retry=3)
    assert [attempt for _, attempt in memo.reconciler.calls] == [0, 3]


def test_the_reconciler_gets_a_plain_snapshot_of_the_object():
    memo = memo_with(Outcome(Verdict.READY))
    body = {**raw("Ready"), "extra": "kopf-internal"}
    handle(memo, body=body)
    given, _ = memo.reconciler.calls[0]
    assert type(given) is dict and set(given) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert given["metadata"]["name"] == KEY[1] and given["status"] == {"phase": "Ready"}


def test_the_object_is_locked_against_reverification_while_the_handler_reconciles():
    memo = memo_with(Outcome(Verdict.READY))
    memo.reconciler.lock_of = memo.resync.lock(KEY)
    handle(memo)
    assert memo.reconciler.held_lock_while_reconciling is True
    assert not memo.resync.lock(KEY).locked()


def test_a_failed_reconcile_releases_the_lock_too():
    memo = memo_with(Outcome(Verdict.STALLED, "bad", "InvalidConfiguration"))
    with pytest.raises(kopf.PermanentError):
        handle(memo)
    assert not memo.resync.lock(KEY).locked()


# -- track_objects -------------------------------------------------------------------------


def track(memo: SimpleNamespace, event_type: str, body: dict[str, Any]) -> None:
    asyncio.run(handlers.track_objects(event={"type": event_type, "object": body}, body=kopf.Body(body), memo=memo))


def test_track_objects_keeps_the_latest_snapshot_of_each_object():
    memo = memo_with()
    track(memo, "ADDED", raw("Loading"))
    track(memo, "MODIFIED", raw("Ready"))
    track(memo, "ADDED", raw(name="other"))
    assert set(memo.objects) == {KEY, ("ns", "other")}
    assert memo.objects[KEY]["status"] == {"phase": "Ready"}
    assert set(memo.objects[KEY]) == {"apiVersion", "kind", "metadata", "spec", "status"}


def test_track_objects_drops_a_deleted_object_and_its_schedule():
    memo = memo_with()
    track(memo, "ADDED", raw("Ready"))
    memo.resync.record(KEY, Outcome(Verdict.READY), 0, None)
    track(memo, "DELETED", raw("Ready"))
    assert KEY not in memo.objects and KEY not in memo.resync.due


def test_track_objects_drops_an_object_that_is_being_deleted():
    memo = memo_with()
    track(memo, "ADDED", raw("Ready"))
    track(memo, "MODIFIED", raw("Ready", deletionTimestamp="2026-01-01T00:00:00Z"))
    assert KEY not in memo.objects


def test_deleting_an_unknown_object_is_harmless():
    memo = memo_with()
    track(memo, "DELETED", raw())
    assert memo.objects == {} and memo.resync.due == {}
