"""The Lease elector (issue 21, item 4) against an in-memory Lease and a clock the test moves:
acquire, renew, takeover only after expiry, conflicts on resourceVersion, and a leader that
stops counting itself leader as soon as it may have lost the Lease."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import kubernetes
import pytest

from imageunlock.errors import KubernetesUnavailableError
from imageunlock.kube.lease import KubeLeases, LeaseConflict, LeaseElector, LeaseRecord, Timing

TIMING = Timing(lease=10, renew_deadline=7, retry=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.now)


class FakeLeases:
    """One Lease in memory, with resourceVersion checks as the API server makes them."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.down = False  # the API server is away
        self.writes: list[LeaseRecord] = []

    def get(self) -> LeaseRecord | None:
        if self.down:
            raise KubernetesUnavailableError("reading Lease failed (HTTP 503)")
        return self.record

    def create(self, record: LeaseRecord) -> LeaseRecord:
        if self.record is not None:
            raise LeaseConflict
        return self._store(record)

    def update(self, record: LeaseRecord) -> LeaseRecord:
        if self.down:
            raise KubernetesUnavailableError("updating Lease failed (HTTP 503)")
        if self.record is None or record.version != self.record.version:
            raise LeaseConflict
        return self._store(record)

    def _store(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.record = replace(record, version=str(self.version))
        self.writes.append(self.record)
        return self.record


def candidate(leases: FakeLeases, clock: Clock, name: str, changes: list | None = None) -> LeaseElector:
    report = (lambda leading: changes.append((name, leading))) if changes is not None else (lambda leading: None)
    return LeaseElector(leases, name, TIMING, on_change=report, clock=clock, wall=clock.wall)


def test_the_first_candidate_creates_the_lease_and_renews_it():
    leases, clock = FakeLeases(), Clock()
    a = candidate(leases, clock, "a")
    assert not a.is_leader()
    assert a.try_acquire_or_renew() and a.is_leader()
    created = leases.record
    assert created is not None and (created.holder, created.duration, created.transitions) == ("a", 10, 0)
    clock.now += 2
    assert a.try_acquire_or_renew()
    renewed = leases.record
    assert renewed.renewed == clock.wall() and renewed.acquired == created.acquired and renewed.transitions == 0


def test_a_standby_waits_for_a_renewed_lease_and_takes_an_expired_one_over():
    leases, clock = FakeLeases(), Clock()
    a, b = candidate(leases, clock, "a"), candidate(leases, clock, "b")
    assert a.try_acquire_or_renew()
    for _ in range(10):  # a keeps renewing: b never gets it, however long
        clock.now += 2
        assert a.try_acquire_or_renew()
        assert not b.try_acquire_or_renew() and not b.is_leader()
    # a dies. b counts the lease duration from when it first saw a's last renewal (its own clock).
    clock.now += 9.9
    assert not b.try_acquire_or_renew()
    clock.now += 0.1
    assert b.try_acquire_or_renew() and b.is_leader()
    taken = leases.record
    assert (taken.holder, taken.transitions, taken.acquired) == ("b", 1, clock.wall())


def test_a_standby_counts_expiry_from_when_it_saw_the_record_not_from_renew_time():
    """Clock skew: a renewTime far in the past (another machine's clock) does not let a
    standby take over a lease it has just seen change."""
    leases, clock = FakeLeases(), Clock()
    leases._store(LeaseRecord("a", 10, None, datetime(2000, 1, 1, tzinfo=UTC), 0))
    b = candidate(leases, clock, "b")
    assert not b.try_acquire_or_renew()
    clock.now += 9
    assert not b.try_acquire_or_renew()
    clock.now += 1
    assert b.try_acquire_or_renew()


def test_two_candidates_racing_for_an_expired_lease_one_wins_by_resource_version():
    leases, clock = FakeLeases(), Clock()
    leases._store(LeaseRecord("dead", 10, None, None, 3))
    a, b = candidate(leases, clock, "a"), candidate(leases, clock, "b")
    assert not a.try_acquire_or_renew() and not b.try_acquire_or_renew()  # both see it valid
    clock.now += 10
    stale = leases.get()
    assert a.try_acquire_or_renew()
    b.leases = _ReadsOnce(leases, stale)  # b read the same version before a wrote
    assert not b.try_acquire_or_renew() and not b.is_leader()
    assert leases.record.holder == "a" and leases.record.transitions == 4


class _ReadsOnce:
    """Answers get() with a stale record once, then is the real store."""

    def __init__(self, leases: FakeLeases, stale: LeaseRecord | None) -> None:
        self.leases, self.stale = leases, stale

    def get(self) -> LeaseRecord | None:
        stale, self.stale = self.stale, None
        return stale or self.leases.get()

    def create(self, record: LeaseRecord) -> LeaseRecord:
        return self.leases.create(record)

    def update(self, record: LeaseRecord) -> LeaseRecord:
        return self.leases.update(record)


def test_a_leader_that_cannot_renew_stops_at_the_renew_deadline_before_the_lease_expires():
    leases, clock = FakeLeases(), Clock()
    a, b = candidate(leases, clock, "a"), candidate(leases, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    leases.down = True  # a's renewals fail from now on (b still reads through its own path below)
    clock.now += 6.9
    with pytest.raises(KubernetesUnavailableError):
        a.try_acquire_or_renew()
    assert a.is_leader()
    clock.now += 0.1  # 7 s after its last renewal began: a stops, 3 s before b may take over
    assert not a.is_leader()
    leases.down = False
    clock.now += 2.9
    assert not b.try_acquire_or_renew()
    clock.now += 0.1
    assert b.try_acquire_or_renew() and b.is_leader()


def test_a_leader_that_finds_another_holder_or_a_conflict_stops_at_once():
    leases, clock = FakeLeases(), Clock()
    a = candidate(leases, clock, "a")
    assert a.try_acquire_or_renew()
    leases._store(replace(leases.record, holder="b"))  # e.g. a paused long enough to lose it
    assert not a.try_acquire_or_renew() and not a.is_leader()

    c = candidate(FakeLeases(), clock, "c")
    assert c.try_acquire_or_renew()
    c.leases = _ReadsOnce(c.leases, replace(c.leases.record, version="0"))  # someone wrote meanwhile
    assert not c.try_acquire_or_renew() and not c.is_leader()


def test_run_reports_changes_releases_on_stop_and_a_standby_takes_over_without_waiting():
    leases, clock, changes = FakeLeases(), Clock(), []
    a, b = candidate(leases, clock, "a", changes), candidate(leases, clock, "b", changes)
    stop = threading.Event()
    stop.set()  # run() makes no attempt; the loop is driven step by step here
    assert a.try_acquire_or_renew()
    a._report()
    assert changes == [("a", True)]
    a.run(stop)  # stop is set: releases at once
    assert not a.is_leader() and changes == [("a", True), ("a", False)]
    assert leases.record.holder == "" and leases.record.duration == 1
    assert b.try_acquire_or_renew() and b.is_leader()  # a released Lease is free at once


def test_a_standby_sleeps_only_until_the_lease_it_sees_expires():
    leases, clock = FakeLeases(), Clock()
    a, b = candidate(leases, clock, "a"), candidate(leases, clock, "b")
    assert a.try_acquire_or_renew()
    assert not b.try_acquire_or_renew()
    assert b._next_wait() == 2  # the retry period
    clock.now += 9
    assert b._next_wait() == pytest.approx(1)  # the lease expires in 1 s
    assert a._next_wait() == 2


def test_timing_must_leave_the_leader_time_to_stop_before_the_lease_expires():
    with pytest.raises(ValueError):
        Timing(lease=10, renew_deadline=10, retry=2)
    with pytest.raises(ValueError):
        Timing(lease=10, renew_deadline=2, retry=2)


def test_every_lease_call_is_bounded_in_time():
    """A half-open connection must not hang the elector thread in a Lease call for ever: it
    would stop leading on its own clock, but never campaign again (its liveness still 200)."""
    calls: list[tuple[str, dict]] = []
    answer = kubernetes.client.V1Lease(
        metadata=kubernetes.client.V1ObjectMeta(resource_version="1"),
        spec=kubernetes.client.V1LeaseSpec(holder_identity="x", lease_duration_seconds=10),
    )

    class Api:
        def __getattr__(self, name):
            def call(*args, **kw):
                calls.append((name, kw))
                return answer

            return call

    leases = KubeLeases(kubernetes.client.ApiClient(), "ns", "lease", timeout=2.5)
    leases.api = Api()
    leases.get()
    leases.create(LeaseRecord("me", 10, None, None, 0, None))
    leases.update(LeaseRecord("me", 10, None, None, 0, "1"))
    assert [name for name, _ in calls] == [
        "read_namespaced_lease",
        "create_namespaced_lease",
        "replace_namespaced_lease",
    ]
    assert all(kw.get("_request_timeout") == 2.5 for _, kw in calls), calls
