"""The agent's kopf layer without a running kopf: the snapshots track_objects keeps, and what
one step of the work loop does with an object (reconcile it through Resync when it selects
this node, remove this node's entry when it no longer does)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from prometheus_client import REGISTRY

from imageunlock.agent import handlers
from imageunlock.agent.node import NodeAgent
from imageunlock.errors import KubernetesUnavailableError

from ..support.fakes import FakeKubernetesApi

KEY = ("ns", "iu")
NODE = "edge-1"


class FakeResync:
    def __init__(self) -> None:
        self.steps: list[tuple[tuple[str, str], dict[str, Any]]] = []
        self.forgotten: list[tuple[str, str]] = []
        self.error: Exception | None = None

    def step(self, key: tuple[str, str], body: dict[str, Any]) -> None:
        if self.error is not None:
            raise self.error
        self.steps.append((key, body))

    def forget(self, key: tuple[str, str]) -> None:
        self.forgotten.append(key)

    due = False

    def due_now(self, key: tuple[str, str]) -> bool:
        return self.due

    def next_due_in(self) -> float:
        return 0.0 if self.due else float("inf")


def raw(phase: str | None = None, selector: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    status = {"nodes": [{"name": NODE, "phase": phase, "observedGeneration": 1}]} if phase else {}
    return {
        "apiVersion": "loader.azaion.com/v1alpha1",
        "kind": "ImageUnlock",
        "metadata": {"namespace": KEY[0], "name": KEY[1], "generation": 1, **meta},
        "spec": {"version": "2.0", **({"nodeSelector": selector} if selector else {})},
        "status": status,
    }


def memo_with(labels: dict[str, str] | None = None) -> SimpleNamespace:
    kube = FakeKubernetesApi()
    kube.nodes[NODE] = {"metadata": {"name": NODE, "labels": labels or {"role": "edge"}}}
    memo = SimpleNamespace(
        kube=kube, agent=NodeAgent(kube, NODE, "docker"), resync=FakeResync(), objects={}, changed=set()
    )
    memo.wake = asyncio.Event()
    return memo


def test_a_selecting_object_goes_to_resync_as_this_node_sees_it():
    memo = memo_with()
    handlers._step(memo, KEY, raw("Ready", selector={"matchLabels": {"role": "edge"}}))
    [(key, seen)] = memo.resync.steps
    assert key == KEY and seen["status"]["phase"] == "Ready" and seen["status"]["observedGeneration"] == 1
    assert "nodes" not in seen["status"]  # the view: this node's entry, not the list


def test_an_object_that_stops_selecting_the_node_loses_its_entry_and_nothing_else_happens():
    memo = memo_with({"role": "spare"})
    handlers._step(memo, KEY, raw("Ready", selector={"matchLabels": {"role": "edge"}}))
    assert memo.resync.steps == [] and memo.resync.forgotten == [KEY]
    assert memo.kube.entry_writes == [(KEY, NODE, None)]


def test_an_object_that_never_selected_the_node_is_left_alone():
    memo = memo_with({"role": "spare"})
    handlers._step(memo, KEY, raw(selector={"matchLabels": {"role": "edge"}}))
    assert memo.resync.steps == [] and memo.kube.entry_writes == []


def test_a_deleted_node_selects_nothing():
    memo = memo_with()
    del memo.kube.nodes[NODE]
    handlers._step(memo, KEY, raw("Ready"))
    assert memo.resync.steps == [] and memo.kube.entry_writes == [(KEY, NODE, None)]


def test_an_invalid_selector_selects_nothing():
    memo = memo_with()
    handlers._step(memo, KEY, raw(selector={"matchExpressions": [{"key": "role", "operator": "Near"}]}))
    assert memo.resync.steps == []


def test_one_objects_trouble_is_logged_not_raised(caplog):
    caplog.set_level(logging.INFO, logger="imageunlock.agent.handlers")
    memo = memo_with()
    memo.resync.error = KubernetesUnavailableError("writing status failed (HTTP 503)")
    handlers._step(memo, KEY, raw("Ready"))
    memo.resync.error = RuntimeError("a bug")
    handlers._step(memo, KEY, raw("Ready"))
    assert "not handled now: writing status failed" in caplog.text and "handling ns/iu failed" in caplog.text


# -- track_objects -------------------------------------------------------------------------


def track(memo: SimpleNamespace, event_type: str, body: dict[str, Any]) -> None:
    asyncio.run(handlers.track_objects(event={"type": event_type, "object": body}, body=kopf.Body(body), memo=memo))


def test_track_objects_keeps_the_latest_snapshot_of_each_object_and_wakes_the_loop():
    memo = memo_with()
    track(memo, "ADDED", raw("Loading"))
    track(memo, "MODIFIED", raw("Ready"))
    track(memo, "ADDED", raw(name="other"))
    assert set(memo.objects) == {KEY, ("ns", "other")}
    assert memo.objects[KEY]["status"]["nodes"][0]["phase"] == "Ready"
    assert set(memo.objects[KEY]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert memo.wake.is_set()


def test_track_objects_drops_a_deleted_object_and_its_schedule():
    memo = memo_with()
    track(memo, "ADDED", raw("Ready"))
    track(memo, "DELETED", raw("Ready"))
    assert KEY not in memo.objects and memo.resync.forgotten == [KEY]


def test_track_objects_drops_an_object_that_is_being_deleted():
    memo = memo_with()
    track(memo, "ADDED", raw("Ready"))
    track(memo, "MODIFIED", raw("Ready", deletionTimestamp="2026-01-01T00:00:00Z"))
    assert KEY not in memo.objects


def test_deleting_an_unknown_object_is_harmless():
    memo = memo_with()
    track(memo, "DELETED", raw())
    assert memo.objects == {}


def test_liveness_fails_once_the_runtime_stayed_unreachable_so_kubelet_remounts_its_socket(monkeypatch):
    """The DaemonSet mounts containerd's socket file itself (issue 18, item 7); a restarted
    containerd makes a new socket the old mount does not see. Liveness then fails after
    RUNTIME_DOWN_RESTART seconds, and the restarted container mounts the new socket."""
    from imageunlock.agent.handlers import RUNTIME_DOWN_RESTART
    from imageunlock.errors import RuntimeUnavailableError

    now = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: now[0])

    class Runtime:
        name = "containerd"
        up = True

        def ping(self):
            if not self.up:
                raise RuntimeUnavailableError("containerd at /run/containerd/containerd.sock is not reachable")

    memo = SimpleNamespace(runtime=Runtime(), agent=SimpleNamespace(node="edge-1"))
    reachable = {"node": "edge-1", "runtime": "containerd"}
    assert handlers.runtime_probe(memo) == "reachable"
    assert REGISTRY.get_sample_value("imageunlock_runtime_reachable", reachable) == 1
    memo.runtime.up = False
    assert handlers.runtime_probe(memo).startswith("unreachable")
    assert REGISTRY.get_sample_value("imageunlock_runtime_reachable", reachable) == 0
    now[0] += RUNTIME_DOWN_RESTART - 1
    assert handlers.runtime_probe(memo).startswith("unreachable")  # not yet: a short outage is no reason
    now[0] += 1
    with pytest.raises(kopf.PermanentError, match="unreachable for"):
        handlers.runtime_probe(memo)
    memo.runtime.up = True
    assert handlers.runtime_probe(memo) == "reachable" and memo.runtime_down_since is None


def test_the_work_loop_offers_only_what_changed_or_is_due():
    """Issue 22, item 1: the loop handed every ImageUnlock to a worker every second (1.7 % of a
    core for 100 idle resources). Now an object goes to a worker when a watch event or the
    Node changed it, or when Resync has a look due."""
    import concurrent.futures

    class Runtime:
        name = "docker"

        def ping(self) -> None:
            return None

    async def run() -> list[int]:
        memo = memo_with()
        memo.settings = SimpleNamespace(verify_interval=0.2)
        memo.runtime = Runtime()
        memo.workers = concurrent.futures.ThreadPoolExecutor(1)
        memo.objects[KEY] = raw(selector={"matchLabels": {"role": "elsewhere"}})  # not this node's
        memo.changed.add(KEY)
        memo.wake.set()  # as track_objects does
        task = asyncio.create_task(handlers._work_loop(memo))
        await asyncio.sleep(0.7)  # several ticks: offered once (it changed), then left alone
        offered = []
        original = handlers._step

        def counting(m, key, body):
            offered.append(key)
            return original(m, key, body)

        handlers._step = counting
        try:
            await asyncio.sleep(0.7)
            quiet = len(offered)
            memo.changed.add(KEY)
            memo.wake.set()
            await asyncio.sleep(0.9)  # well under the loop's 1 s floor: only the change wakes it
            after_change = len(offered)
            memo.resync.due = True  # overdue and never rescheduled: offered at most once a second
            await asyncio.sleep(2.6)
            due = len(offered) - after_change
        finally:
            handlers._step = original
            task.cancel()
            memo.workers.shutdown()
        return [quiet, after_change, due]

    quiet, after_change, due = asyncio.run(run())
    assert quiet == 0 and after_change == 1 and 1 <= due <= 4
