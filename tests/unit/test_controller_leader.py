"""The controller with two replicas (issue 21, item 4): only the Lease holder writes, a
standby drops what it is handed, and a new leader summarises every object it knows."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from imageunlock.controller import handlers as controller
from imageunlock.controller.handlers import SummaryWriter
from imageunlock.kube.nodes import NodeInfo, Placement
from imageunlock.metrics import CONTROLLER_REGISTRY as REGISTRY
from imageunlock.workqueue import WorkQueue

from ..support.fakes import FakeKubernetesApi

KEY = ("ns", "iu")


def body_with_stale_entry(kube: FakeKubernetesApi) -> dict:
    kube.statuses[KEY] = {
        "nodes": [
            {"name": "a", "phase": "Ready", "observedGeneration": 1, "reason": "Unlocked"},
            {"name": "gone", "phase": "Ready", "observedGeneration": 1},
        ]
    }
    return {"metadata": {"namespace": "ns", "name": "iu", "generation": 1}, "spec": {}, "status": kube.status(*KEY)}


def test_a_writer_that_may_not_write_writes_nothing():
    kube = FakeKubernetesApi()
    body = body_with_stale_entry(kube)
    assert not SummaryWriter(kube, Placement(), may_write=lambda: False).sync(body, [NodeInfo("a")])
    assert kube.writes == [] and [e["name"] for e in kube.statuses[KEY]["nodes"]] == ["a", "gone"]


def test_a_writer_that_loses_leadership_mid_summary_stops_at_once():
    kube = FakeKubernetesApi()
    body = body_with_stale_entry(kube)
    answers = iter([True])  # one write allowed (the prune), then leadership is gone
    assert not SummaryWriter(kube, Placement(), may_write=lambda: next(answers, False)).sync(body, [NodeInfo("a")])
    assert [e["name"] for e in kube.statuses[KEY]["nodes"]] == ["a"]  # pruned
    assert "readyNodes" not in kube.statuses[KEY]  # the summary itself: not written


class Elector:
    def __init__(self) -> None:
        self.leading = False

    def is_leader(self) -> bool:
        return self.leading


def test_a_standby_drops_its_keys_and_a_new_leader_queues_every_known_object():
    synced: list[tuple[str, str]] = []

    class Writer:
        def sync(self, body, nodes):
            synced.append((body["metadata"]["namespace"], body["metadata"]["name"]))
            return True

    async def run() -> None:
        loop = asyncio.get_running_loop()
        memo = SimpleNamespace(objects={}, nodes={}, queue=WorkQueue(), writer=Writer(), elector=Elector())
        for name in ("a", "b"):
            memo.objects[("ns", name)] = {"metadata": {"namespace": "ns", "name": name}}
            memo.queue.add(("ns", name))
        task = asyncio.create_task(controller._summary_loop(memo))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not len(memo.queue):
                break
        assert synced == [] and not controller.leader_probe(memo)  # a standby: handed, dropped

        memo.elector.leading = True
        await asyncio.to_thread(controller._on_leadership, memo, loop, True)  # as from the elector's thread
        assert REGISTRY.get_sample_value("imageunlock_controller_leader") == 1
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(synced) == 2:
                break
        assert sorted(synced) == [("ns", "a"), ("ns", "b")] and controller.leader_probe(memo)
        controller._on_leadership(memo, loop, False)
        assert REGISTRY.get_sample_value("imageunlock_controller_leader") == 0
        task.cancel()

    asyncio.run(run())
