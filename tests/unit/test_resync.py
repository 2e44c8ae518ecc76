"""What an agent does when (issue 8, items 5 and 11; issue 11): new generations at once,
re-verification, retries and Stalled re-checks, with a fake reconciler and a fake clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace

from imageunlock.agent.reconciler import Inputs, Outcome, Verdict
from imageunlock.agent.resync import Resync
from imageunlock.errors import RuntimeUnavailableError
from imageunlock.kube.models import NodeEntry

KEY = ("ns", "iu")


class FakeReconciler:
    def __init__(self, *outcomes: Outcome) -> None:
        self.settings = SimpleNamespace(verify_interval=300.0)
        self.outcomes = list(outcomes)
        self.calls: list[int] = []  # the attempt of each reconcile
        self.ready = True
        self.current_inputs = Inputs(1, None, "secret-v1", "archive-v1")
        self.verifications = 0

    def entry(self, body):
        """This node's entry: the bodies below hold its fields as their status."""
        return NodeEntry.model_validate({"name": "n", **body["status"]})

    def reconcile(self, body, attempt=0):
        self.calls.append(attempt)
        return self.outcomes.pop(0)

    def still_ready(self, body):
        if isinstance(self.ready, Exception):
            raise self.ready
        return self.ready

    def inputs(self, body):
        return self.current_inputs

    def verified(self, body):
        self.verifications += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body(phase: str, observed: int = 1, generation: int = 1) -> dict:
    return {
        "metadata": {"namespace": "ns", "name": "iu", "generation": generation},
        "status": {"phase": phase, "observedGeneration": observed},
    }


def make(*outcomes: Outcome):
    fake, clock = FakeReconciler(*outcomes), Clock()
    return Resync(fake, clock), fake, clock


def test_ready_and_still_true_is_only_looked_at_every_interval():
    resync, fake, clock = make()
    assert resync.step(KEY, body("Ready")) == 300  # the next look, for the agent's work queue
    clock.now += 299
    assert resync.step(KEY, body("Ready")) == 1
    assert fake.calls == [] and resync.due[KEY].at == 1300.0 and fake.verifications == 1


def test_a_recheck_request_is_handled_at_once_and_only_once():
    resync, fake, _clock = make()
    resync.step(KEY, body("Ready"))
    requested = body("Ready")
    requested["metadata"]["annotations"] = {"loader.azaion.com/requested-at": "now-1"}
    resync.step(KEY, requested)  # long before the interval is up
    assert fake.verifications == 2
    requested["status"]["lastHandledRequestedAt"] = "now-1"  # what the verification wrote
    resync.step(KEY, requested)
    assert fake.verifications == 2


def test_a_transient_failure_is_retried_when_the_status_says_with_growing_attempts():
    resync, fake, clock = make(
        Outcome(Verdict.RETRY, delay=5), Outcome(Verdict.RETRY, delay=10), Outcome(Verdict.READY)
    )
    fake.ready = False  # an image went missing
    resync.step(KEY, body("Ready"))
    assert fake.calls == [0] and resync.due[KEY].at == 1005.0
    # the status now shows a working phase ("retrying in 5s"): not skipped, retried on time
    clock.now += 4.9
    resync.step(KEY, body("Loading"))
    assert fake.calls == [0]
    clock.now += 0.1
    resync.step(KEY, body("Loading"))
    assert fake.calls == [0, 1] and resync.due[KEY].at == clock.now + 10
    clock.now += 10
    resync.step(KEY, body("Loading"))
    assert fake.calls == [0, 1, 2] and resync.due[KEY].attempt == 0


def test_a_new_generation_is_reconciled_at_once_and_its_retries_wait_for_the_backoff():
    resync, fake, clock = make(Outcome(Verdict.RETRY, delay=5), Outcome(Verdict.READY))
    resync.step(KEY, body("Ready"))  # generation 1 verified: next look in 300 s
    resync.step(KEY, body("Ready", observed=1, generation=2))  # the spec changed: at once
    assert fake.calls == [0]
    # the retry's status still shows generation 1 as observed: no new generation, so it waits
    clock.now += 4.9
    resync.step(KEY, body("Pending", observed=1, generation=2))
    assert fake.calls == [0]
    clock.now += 0.1
    resync.step(KEY, body("Pending", observed=1, generation=2))
    assert fake.calls == [0, 1]


def test_stalled_is_rechecked_only_when_an_input_changed():
    resync, fake, clock = make(Outcome(Verdict.STALLED, "bad credentials", "AuthenticationFailed"))
    resync.record(KEY, Outcome(Verdict.STALLED), 0, fake.current_inputs, 1)
    for _ in range(5):  # five verify intervals: no re-login with the same credentials
        clock.now += 300
        resync.step(KEY, body("Failed"))
    assert fake.calls == []
    fake.current_inputs = Inputs(1, None, "secret-v2", "archive-v1")  # the Secret was edited
    clock.now += 300
    resync.step(KEY, body("Failed"))
    assert fake.calls == [0]
    clock.now += 300
    resync.step(KEY, body("Failed"))
    assert fake.calls == [0]  # and it stalled again on those inputs: quiet again


def test_runtime_down_during_a_check_postpones_it_without_reconciling():
    resync, fake, clock = make()
    fake.ready = RuntimeUnavailableError("docker down")
    resync.step(KEY, body("Ready"))
    assert fake.calls == [] and resync.due[KEY].at == clock.now + 30  # soon, not a whole interval


def test_forget_drops_state():
    resync, _fake, _clock = make()
    resync.step(KEY, body("Ready"))
    resync.forget(KEY)
    assert KEY not in resync.due


def test_rejected_credentials_are_not_retried_because_the_archive_was_touched():
    resync, fake, clock = make(Outcome(Verdict.STALLED))
    resync.record(KEY, Outcome(Verdict.STALLED), 0, fake.current_inputs, 1)
    stalled = body("Failed")
    stalled["status"]["reason"] = "AuthenticationFailed"
    fake.current_inputs = Inputs(1, None, "secret-v1", "archive-touched")
    clock.now += 300
    resync.step(KEY, stalled)
    assert fake.calls == []  # no login with the same, known-bad credentials
    stalled["status"]["reason"] = "ArchiveNotFound"
    clock.now += 300
    resync.step(KEY, stalled)
    assert fake.calls == [0]  # for an archive problem, a new archive is worth a look


def test_a_check_that_finds_everything_in_place_is_recorded_hourly_or_on_request():
    """Every status write reaches every watcher: a steady fleet must not write on each check."""
    resync, fake, clock = make()
    recent = body("Ready")
    recent["status"]["lastVerifiedTime"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    resync.step(KEY, recent)
    assert fake.verifications == 0 and resync.due[KEY].at == clock.now + 300  # checked, not recorded
    recent["metadata"]["annotations"] = {"loader.azaion.com/requested-at": "now"}
    resync.step(KEY, recent)
    assert fake.verifications == 1
    old = body("Ready")
    old["status"]["lastVerifiedTime"] = "2026-01-01T00:00:00Z"
    clock.now += 300
    resync.step(KEY, old)
    assert fake.verifications == 2


def test_a_pending_request_is_acted_on_once_then_the_retry_backoff_holds():
    """Review finding 3: a retry's status does not record the request, so it stayed pending
    and every tick reconciled again (one login per second while the API was failing)."""
    resync, fake, clock = make(*[Outcome(Verdict.RETRY, delay=300)] * 5)
    fake.ready = False
    asked = body("Ready")
    asked["metadata"]["annotations"] = {"loader.azaion.com/requested-at": "now"}
    for _ in range(5):
        resync.step(KEY, asked)
        clock.now += 1
    assert fake.calls == [0]


def test_an_object_created_anew_under_the_same_name_is_not_held_to_the_old_schedule():
    """Review finding 4: a late record of the deleted object must not delay the new one."""
    resync, fake, _clock = make(Outcome(Verdict.READY))
    resync.record(KEY, Outcome(Verdict.READY), 0, None, 1)
    resync.due[KEY] = replace(resync.due[KEY], uid="old")
    fresh = body("Pending", observed=0)
    fresh["metadata"]["uid"] = "new"
    resync.step(KEY, fresh)
    assert fake.calls == [0]


def _requested(phase: str, value: str) -> dict:
    found = body(phase)
    found["metadata"]["annotations"] = {"loader.azaion.com/requested-at": value}
    return found


def test_requested_rechecks_are_handled_at_most_every_30_s_and_never_dropped():
    """Issue 18, item 3: a script bumping requested-at on an ImageUnlock that can never
    succeed costs at most one re-check per node per 30 s; the latest request still counts."""
    stalled = Outcome(Verdict.STALLED, "Secret ns/creds not found", "InvalidConfiguration")
    resync, fake, clock = make(*[stalled] * 10)
    resync.step(KEY, body("Failed"))
    assert fake.calls == [0]
    for n in range(1, 11):  # ten requests, one a second
        fake.current_inputs = replace(fake.current_inputs, requested=f"r{n}")
        next_look = resync.step(KEY, _requested("Failed", f"r{n}"))
        clock.now += 1
    assert len(fake.calls) == 2  # the first request at once, the rest deferred
    assert next_look == 30 - 9  # to the interval's end, not to the next verification
    clock.now += 19  # 29 s after the first request was handled: still deferred
    resync.step(KEY, _requested("Failed", "r10"))
    assert len(fake.calls) == 2
    clock.now += 1.5
    resync.step(KEY, _requested("Failed", "r10"))
    assert len(fake.calls) == 3  # the latest request, at the interval's end
    clock.now += 5
    resync.step(KEY, _requested("Failed", "r10"))
    assert len(fake.calls) == 3  # acted on once


def test_spec_edits_in_a_loop_cost_one_reconcile_per_interval_and_the_latest_counts():
    """Review of issue 18 (medium): each new generation bypassed every schedule, so ten edits
    a second cost each node ten logins, thirty status writes and twenty events."""
    stalled = Outcome(Verdict.STALLED, "rejected", "AuthenticationFailed")
    resync, fake, clock = make(*[stalled] * 10)
    for generation in range(1, 11):  # ten edits, 0.1 s apart
        next_look = resync.step(KEY, body("Failed", observed=generation - 1, generation=generation))
        clock.now += 0.1
    assert len(fake.calls) == 1
    assert round(next_look, 6) == 10 - 0.9  # looked at again when the interval is up
    clock.now += 9.0  # 10 s after the first reconcile began
    resync.step(KEY, body("Failed", observed=1, generation=10))
    assert len(fake.calls) == 2 and resync.due[KEY].generation == 10
    clock.now += 1
    resync.step(KEY, body("Failed", observed=10, generation=10))
    assert len(fake.calls) == 2  # and only once


def test_an_import_held_by_disk_pressure_starts_as_soon_as_the_condition_clears():
    """Issue 20, item 2: a retry for NodeDiskPressure waits for its backoff while the node is
    under pressure, and is due at once when the condition clears (the agent's Node watch
    queues the object then), not at the end of the backoff."""
    resync, fake, clock = make(Outcome(Verdict.RETRY, reason="NodeDiskPressure", delay=60), Outcome(Verdict.READY))
    fake.disk_pressure = lambda: pressure
    pressure = True
    resync.step(KEY, body("Pending", observed=0))
    assert fake.calls == [0] and resync.due[KEY].reason == "NodeDiskPressure"
    clock.now += 1
    assert resync.step(KEY, body("Pending", observed=0)) == 59  # still under pressure: the backoff holds
    assert fake.calls == [0]
    pressure = False
    resync.step(KEY, body("Pending", observed=0))
    assert fake.calls == [0, 1]


def test_another_retry_is_not_hurried_by_a_node_without_disk_pressure():
    resync, fake, clock = make(Outcome(Verdict.RETRY, reason="RuntimeUnavailable", delay=60))
    fake.disk_pressure = lambda: False
    resync.step(KEY, body("Pending", observed=0))
    clock.now += 1
    assert resync.step(KEY, body("Pending", observed=0)) == 59 and fake.calls == [0]


def test_a_changed_secret_rechecks_a_stalled_object_at_once_not_at_the_interval():
    """Issue 21, item 5: the agent's Secret watch pokes the objects naming the Secret."""
    resync, fake, clock = make(Outcome(Verdict.STALLED, "no Secret", "InvalidConfiguration"), Outcome(Verdict.READY))
    fake.current_inputs = Inputs(1, None, None, "archive-v1")  # the Secret does not exist
    resync.step(KEY, body("Pending", observed=0))
    assert fake.calls == [0]
    clock.now += 5
    resync.step(KEY, body("Failed"))  # not poked: the schedule holds
    assert fake.calls == [0]
    fake.current_inputs = Inputs(1, None, "secret-v1", "archive-v1")  # created
    resync.poke(KEY)
    resync.step(KEY, body("Failed"))
    assert fake.calls == [0, 0]
    # a poke is taken once: the next step follows the schedule again
    resync.step(KEY, body("Ready"))
    assert fake.calls == [0, 0]


def test_a_changed_secret_does_not_touch_a_ready_object():
    resync, fake, clock = make()
    resync.step(KEY, body("Ready"))
    resync.poke(KEY)
    clock.now += 1
    assert resync.step(KEY, body("Ready")) == 299
    assert fake.calls == [] and fake.verifications == 1
