"""A work queue with controller-runtime's semantics (client-go's ``workqueue``), for asyncio.

* a key is queued at most once however often it is added (dedupe);
* a key being processed is never handed out again until :meth:`done`; added meanwhile, it is
  queued again once done (so no change is lost and no key runs twice at once);
* :meth:`add_after` queues a key later; :meth:`add_rate_limited` later still after each
  failure of that key (exponential backoff with jitter, capped); :meth:`forget` resets it.

Pure but for the clock: tests drive it with their own ``clock``. Not thread-safe: the
agent's workers and the controller's summary loop use theirs from the event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    def __init__(
        self,
        base: float = 1.0,
        cap: float = 300.0,
        jitter: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.base, self.cap, self.jitter, self.clock = base, cap, jitter, clock
        self._rng = rng or random.Random()
        self._queue: list[K] = []  # ready keys, in order
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()  # added while processing: queued again when done
        self._later: list[tuple[float, int, K]] = []  # (when, tie-breaker, key)
        self._when: dict[K, float] = {}  # the soonest time each later key is due
        self._order = itertools.count()
        self._failures: dict[K, int] = {}
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key: K) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
            self._wake.set()

    def add_after(self, key: K, delay: float) -> None:
        """Queue ``key`` in ``delay`` seconds; a key already due sooner stays as it is (so a
        burst of adds within the delay is one)."""
        if delay <= 0:
            self.add(key)
            return
        when = self.clock() + delay
        if self._when.get(key, float("inf")) <= when:
            return
        self._when[key] = when
        heapq.heappush(self._later, (when, next(self._order), key))
        self._wake.set()

    def add_rate_limited(self, key: K) -> float:
        """Queue ``key`` after its backoff (base * 2^failures, capped, +- jitter); the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = float(min(self.cap, self.base * 2.0**failures))
        delay *= 1 + self._rng.uniform(-self.jitter, self.jitter)
        self.add_after(key, delay)
        return delay

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def ready(self) -> K | None:
        """The next key due now (marked as processing), or None."""
        self._promote()
        if not self._queue:
            return None
        key = self._queue.pop(0)
        self._queued.discard(key)
        self._processing.add(key)
        return key

    async def get(self) -> K:
        """Wait for the next key due; mark it as processing."""
        while True:
            if (key := self.ready()) is not None:
                return key
            self._wake.clear()
            timeout = max(0.0, self._later[0][0] - self.clock()) if self._later else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _promote(self) -> None:
        now = self.clock()
        while self._later and self._later[0][0] <= now:
            when, _, key = heapq.heappop(self._later)
            if self._when.get(key) == when:  # else superseded by a sooner one
                del self._when[key]
                self.add(key)
