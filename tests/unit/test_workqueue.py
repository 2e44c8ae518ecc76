"""The work queue: dedupe, never one key twice at once, add-after, per-key backoff with jitter."""

from __future__ import annotations

import asyncio
import random

from imageunlock.workqueue import WorkQueue


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_added_many_times_is_queued_once():
    queue: WorkQueue[str] = WorkQueue(clock=Clock())
    for _ in range(3):
        queue.add("a")
    queue.add("b")
    assert [queue.ready(), queue.ready(), queue.ready()] == ["a", "b", None]


def test_a_key_being_processed_is_never_handed_out_again_until_done_and_no_add_is_lost():
    queue: WorkQueue[str] = WorkQueue(clock=Clock())
    queue.add("a")
    assert queue.ready() == "a"
    queue.add("a")  # changed while being processed
    assert queue.ready() is None
    queue.done("a")
    assert queue.ready() == "a"  # once more, for the change
    queue.done("a")
    assert queue.ready() is None


def test_add_after_waits_for_its_time():
    clock = Clock()
    queue: WorkQueue[str] = WorkQueue(clock=clock)
    queue.add_after("a", 5)
    clock.now += 4.9
    assert queue.ready() is None
    clock.now += 0.1
    assert queue.ready() == "a"


def test_failures_back_off_exponentially_with_jitter_capped_and_forget_resets():
    clock = Clock()
    queue: WorkQueue[str] = WorkQueue(base=1, cap=8, jitter=0.2, clock=clock, rng=random.Random(1))
    delays = [queue.add_rate_limited("a") for _ in range(6)]
    for delay, nominal in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    assert len(set(delays)) == len(delays)  # jittered: failing keys do not retry in lock-step
    assert queue.failures("a") == 6
    queue.forget("a")
    assert queue.failures("a") == 0 and 0.8 <= queue.add_rate_limited("a") <= 1.2


def test_get_waits_for_a_key_added_later():
    async def run() -> str:
        queue: WorkQueue[str] = WorkQueue()
        queue.add_after("a", 0.05)
        return await asyncio.wait_for(queue.get(), 5)

    assert asyncio.run(run()) == "a"


def test_get_wakes_when_a_key_is_added_while_waiting():
    async def run() -> str:
        queue: WorkQueue[str] = WorkQueue()
        waiter = asyncio.create_task(queue.get())
        await asyncio.sleep(0.01)
        queue.add("b")
        return await asyncio.wait_for(waiter, 5)

    assert asyncio.run(run()) == "b"


def test_a_burst_of_adds_after_is_one_and_the_soonest_time_wins():
    clock = Clock()
    queue: WorkQueue[str] = WorkQueue(clock=clock)
    queue.add_after("a", 10)  # a retry's backoff
    for _ in range(5):
        queue.add_after("a", 0.2)  # a burst of watch events
        clock.now += 0.01
    clock.now += 0.2
    assert queue.ready() == "a"
    queue.done("a")
    clock.now += 20
    assert queue.ready() is None  # the superseded later entries are gone
