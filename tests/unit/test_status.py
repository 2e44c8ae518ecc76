"""Building kstatus-compliant status (pure): conditions through a lifecycle, retry messages,
backoff and the progress throttle."""

from __future__ import annotations

from imageunlock.engine.models import Phase
from imageunlock.kube import conditions as st


def _cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_kstatus_conditions_through_a_lifecycle():
    working = st.working(Phase.LOADING, "decrypting", 3, None, 50, 200, now="t1")
    assert working["phase"] == "Loading" and working["progress"]["text"] == "25%"
    assert _cond(working, "Reconciling")["status"] == "True"
    assert _cond(working, "Ready")["status"] == "False"
    assert _cond(working, "Stalled")["status"] == "False"
    assert "observedGeneration" not in working  # only a finished reconcile claims the generation

    done = st.ready({"a:1": "sha256:x"}, False, 3, working["conditions"], 200, now="t2", unlocked_at="t2")
    assert done["observedGeneration"] == 3 and done["phase"] == "Ready" and done["lastUnlockTime"] == "t2"
    assert (_cond(done, "Ready")["status"], _cond(done, "Ready")["lastTransitionTime"]) == ("True", "t2")
    assert _cond(done, "Reconciling")["status"] == "False"
    assert _cond(done, "Stalled")["lastTransitionTime"] == "t1"  # unchanged status keeps its time
    assert done["images"] == [{"name": "a:1", "id": "sha256:x", "present": True}]

    failed = st.stalled("AuthenticationFailed", "bad password", 4, done["conditions"], now="t3")
    assert failed["phase"] == "Failed" and failed["observedGeneration"] == 4
    assert _cond(failed, "Stalled") == {
        "type": "Stalled",
        "status": "True",
        "reason": "AuthenticationFailed",
        "message": "bad password",
        "observedGeneration": 4,
        "lastTransitionTime": "t3",
    }
    assert _cond(failed, "Ready")["reason"] == "AuthenticationFailed"
    # merge-patched over `done`, the images of generation 3 must not survive as "present"
    assert failed["images"] is None and failed["progress"] is None


def test_retrying_message_names_attempt_and_delay():
    retry = st.retrying("ResourceApiUnavailable", "HTTP 503", 2, 10, 1, None, now="t")
    assert retry["message"] == "attempt 2 failed: HTTP 503; retrying in 10s"
    assert _cond(retry, "Reconciling")["status"] == "True" and _cond(retry, "Stalled")["status"] == "False"


def test_backoff_doubles_and_caps():
    assert [st.backoff(a, 5, 60) for a in range(6)] == [5, 10, 20, 40, 60, 60]


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
