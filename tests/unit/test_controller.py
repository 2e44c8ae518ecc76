"""The controller's writer (issue 11): it writes a summary only when it changed, and removes
the entries of nodes that left the selection by applying as that node's manager."""

from __future__ import annotations

from imageunlock.controller import MANAGER, SummaryWriter
from imageunlock.nodes import NodeInfo, Placement

from ..support.fakes import FakeKubernetesApi

KEY = ("ns", "iu")


class RecordingKube(FakeKubernetesApi):
    def __init__(self) -> None:
        super().__init__()
        self.managers: list[str | None] = []

    def patch_status(self, namespace, name, status, manager=None):
        self.managers.append(manager)
        super().patch_status(namespace, name, status)


def test_the_summary_is_written_once_and_stale_entries_are_removed():
    kube = RecordingKube()
    kube.statuses[KEY] = {
        "nodes": [
            {"name": "a", "phase": "Ready", "observedGeneration": 1, "reason": "Unlocked"},
            {"name": "gone", "phase": "Ready", "observedGeneration": 1},
        ]
    }
    writer = SummaryWriter(kube, Placement())
    body = {"metadata": {"namespace": "ns", "name": "iu", "generation": 1}, "spec": {}, "status": kube.status(*KEY)}
    assert writer.sync(body, [NodeInfo("a")])
    assert [e["name"] for e in kube.statuses[KEY]["nodes"]] == ["a"]
    assert kube.statuses[KEY]["readyNodes"] == "1/1" and kube.managers == [MANAGER]
    again = {**body, "status": kube.status(*KEY)}
    assert not writer.sync(again, [NodeInfo("a")])  # nothing changed: no write
    assert len(kube.writes) == 1
