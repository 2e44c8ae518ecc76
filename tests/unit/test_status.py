"""kstatus (pure): the three marks on the controller's summary (conditions) and on a node's
entry (phase and reason), backoff and the progress throttle."""

from __future__ import annotations

import random
import statistics

from imageunlock.engine.models import Phase
from imageunlock.kube import conditions as st
from imageunlock.kube.models import Image, ImageUnlockStatus, NodeEntry, SummaryProgress


def _cond(status: ImageUnlockStatus, type_: str) -> dict[str, object]:
    return next(c.dump() for c in status.conditions if c.type == type_)


def test_kstatus_conditions_through_a_lifecycle():
    working = st.mark_reconciling(ImageUnlockStatus(), Phase.LOADING, "Loading", "decrypting", 3, now="t1")
    assert working.phase is Phase.LOADING and working.message == "decrypting" and working.observed_generation == 3
    assert _cond(working, "Reconciling")["status"] == "True"
    assert _cond(working, "Ready")["status"] == "False"
    assert _cond(working, "Stalled")["status"] == "False"

    done = st.mark_ready(working, "Unlocked", "7 image(s) ready", 3, now="t2")
    assert done.observed_generation == 3 and done.phase is Phase.READY and done.message == "7 image(s) ready"
    assert (_cond(done, "Ready")["status"], _cond(done, "Ready")["lastTransitionTime"]) == ("True", "t2")
    assert _cond(done, "Reconciling") == {
        "type": "Reconciling",
        "status": "False",
        "reason": "Succeeded",
        "message": "",
        "observedGeneration": 3,
        "lastTransitionTime": "t2",
    }
    assert _cond(done, "Stalled")["lastTransitionTime"] == "t1"  # unchanged status keeps its time

    shown = done.model_copy(update={"images": [], "progress": SummaryProgress(percent=100, text="100%")})
    failed = st.mark_stalled(shown, "AuthenticationFailed", "bad password", 4, now="t3")
    assert failed.phase is Phase.FAILED and failed.observed_generation == 4
    assert _cond(failed, "Stalled") == {
        "type": "Stalled",
        "status": "True",
        "reason": "AuthenticationFailed",
        "message": "bad password",
        "observedGeneration": 4,  # every condition says which generation it was set for
        "lastTransitionTime": "t3",
    }
    assert _cond(failed, "Ready")["reason"] == "AuthenticationFailed"
    # what generation 3 verified does not hold for generation 4: cleared (a merge patch removes it)
    assert failed.images is None and failed.progress is None


def test_a_stalled_summary_may_still_be_reconciling_elsewhere():
    stalled = st.mark_stalled(ImageUnlockStatus(), "ArchiveNotFound", "node b: missing", 1, "t", "still working on a")
    assert _cond(stalled, "Stalled")["status"] == "True" and stalled.message == "node b: missing"
    assert _cond(stalled, "Reconciling") == {
        "type": "Reconciling",
        "status": "True",
        "reason": "NodesWorking",
        "message": "still working on a",
        "observedGeneration": 1,
        "lastTransitionTime": "t",
    }


def test_an_entry_keeps_the_state_as_phase_and_reason_and_claims_only_a_finished_generation():
    start = NodeEntry(name="n", runtime="docker", observed_generation=2, last_unlock_time="T0")
    working = st.mark_reconciling(start, Phase.FETCHING_KEY, "ResourceApiUnavailable", "attempt 1 failed", 3)
    assert working.dump() == {
        "name": "n",
        "runtime": "docker",
        "phase": "FetchingKey",
        "reason": "ResourceApiUnavailable",
        "message": "attempt 1 failed",
        "observedGeneration": 2,  # generation 3 is not finished
        "lastUnlockTime": "T0",
    }
    ready = st.mark_ready(working, "AlreadyPresent", "7 image(s) already present and verified", 3)
    assert (ready.phase, ready.reason, ready.observed_generation) == (Phase.READY, "AlreadyPresent", 3)
    verified = ready.model_copy(update={"images": [Image(name="a:1", id="sha256:1")], "images_digest": "sha256:d"})
    failed = st.mark_stalled(verified, "ArchiveInvalid", "wrong key", 4)
    assert (failed.phase, failed.reason, failed.message, failed.observed_generation) == (
        Phase.FAILED,
        "ArchiveInvalid",
        "wrong key",
        4,
    )
    assert failed.images is None and failed.images_digest is None and "conditions" not in failed.dump()


def test_an_entry_stands_for_the_conditions_its_phase_says():
    assert st.condition_states(NodeEntry(name="n")) == {
        "Ready": "Unknown",
        "Reconciling": "Unknown",
        "Stalled": "Unknown",
    }
    ready = st.condition_states(NodeEntry(name="n", phase=Phase.READY))
    assert ready == {"Ready": "True", "Reconciling": "False", "Stalled": "False"}
    stalled = st.condition_states(NodeEntry(name="n", phase=Phase.FAILED))
    assert stalled == {"Ready": "False", "Reconciling": "False", "Stalled": "True"}
    loading = st.condition_states(NodeEntry(name="n", phase=Phase.LOADING))
    assert loading == {"Ready": "False", "Reconciling": "True", "Stalled": "False"}


def test_backoff_doubles_and_caps():
    assert [st.backoff(a, 5, 60) for a in range(6)] == [5, 10, 20, 40, 60, 60]


def test_retries_are_spread_over_the_whole_backoff_window_never_past_its_ceiling():
    """Issue 21: nodes that failed together (an outage) must not retry in lock-step. Full
    jitter: each delay is uniform over [0, backoff]; no clock, only the drawn delays."""
    rng = random.Random(21)
    for attempt, ceiling in enumerate([5, 10, 20, 40, 60, 60]):
        delays = [st.full_jitter(attempt, 5, 60, rng) for _ in range(500)]
        assert all(0.0 <= d <= ceiling for d in delays)
        # spread over the window: both ends reached, no value repeated (no lock-step)
        assert min(delays) < 0.1 * ceiling and max(delays) > 0.9 * ceiling
        assert len(set(delays)) == len(delays)
        assert 0.4 * ceiling < statistics.mean(delays) < 0.6 * ceiling
    # two nodes drawing on their own: their retries do not coincide
    a, b = random.Random(1), random.Random(2)
    assert [st.full_jitter(3, 5, 60, a) for _ in range(5)] != [st.full_jitter(3, 5, 60, b) for _ in range(5)]


def test_throttle_lets_phase_changes_and_intervals_through():
    now = [0.0]
    throttle = st.Throttle(2.0, clock=lambda: now[0])
    assert throttle.ready("Loading")
    now[0] = 1.0
    assert not throttle.ready("Loading")
    assert throttle.ready("Verifying")
    now[0] = 1.5
    assert throttle.ready("Verifying", final=True)
    now[0] = 4.0
    assert throttle.ready("Verifying")
