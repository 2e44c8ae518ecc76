"""The controller's writer (issue 11): it writes a summary only when it changed, and removes
the entries of nodes that left the selection by applying as that node's manager."""

from __future__ import annotations

import logging

from imageunlock.controller.handlers import MANAGER, SummaryWriter
from imageunlock.kube.nodes import NodeInfo, Placement

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


def test_each_change_of_the_cluster_verdict_is_logged_once(caplog):
    """Issue 21: Stalled at WARNING, Ready at INFO, with the object and the reason; a write
    that changes neither (progress, times) logs nothing."""
    caplog.set_level(logging.INFO)
    kube = RecordingKube()
    writer = SummaryWriter(kube, Placement())

    def sync(entry: dict[str, object]) -> None:
        kube.statuses[KEY] = {**kube.statuses.get(KEY, {}), "nodes": [{"name": "a", "observedGeneration": 1, **entry}]}
        writer.sync(
            {"metadata": {"namespace": "ns", "name": "iu", "generation": 1}, "status": kube.status(*KEY)},
            [NodeInfo("a")],
        )

    sync({"phase": "Failed", "reason": "ArchiveNotFound", "message": "no archive"})
    sync(
        {
            "phase": "Failed",
            "reason": "ArchiveNotFound",
            "message": "no archive",
            "lastVerifiedTime": "2026-12-06T00:00:00Z",
        }
    )
    sync({"phase": "Ready", "reason": "Unlocked", "images": [{"name": "a:1", "id": "sha256:" + "0" * 64}]})
    lines = [
        (r.levelno, r.reason, f"{r.k8s_ref['namespace']}/{r.k8s_ref['name']}")
        for r in caplog.records
        if r.name == "imageunlock.controller.handlers" and hasattr(r, "reason")
    ]
    assert lines == [(logging.WARNING, "ArchiveNotFound", "ns/iu"), (logging.INFO, "Unlocked", "ns/iu")]


def test_the_summary_loop_retries_a_failed_key_with_backoff_and_never_drops_it():
    """Issue 19, item 4: the controller dropped a key whose summary raised anything but an
    UnlockError, and retried the others every second in lock-step. Now every failure is
    re-queued with per-key backoff; a burst of events is one summary."""
    import asyncio
    from types import SimpleNamespace

    from imageunlock.controller import handlers as controller
    from imageunlock.errors import KubernetesUnavailableError
    from imageunlock.workqueue import WorkQueue

    calls: list[tuple[str, str]] = []
    failures = {("ns", "a"): [KubernetesUnavailableError("HTTP 503"), RuntimeError("a bug")]}

    class Writer:
        def sync(self, body, nodes):
            key = (body["metadata"]["namespace"], body["metadata"]["name"])
            calls.append(key)
            if failures.get(key):
                raise failures[key].pop(0)
            return True

    async def run() -> None:
        memo = SimpleNamespace(objects={}, nodes={}, queue=WorkQueue(base=0.01, cap=0.05), writer=Writer())
        for name in ("a", "b"):
            memo.objects[("ns", name)] = {"metadata": {"namespace": "ns", "name": name}}
        for _ in range(5):  # a burst of watch events for b
            memo.queue.add_after(("ns", "b"), controller.COALESCE)
        memo.queue.add_after(("ns", "a"), controller.COALESCE)
        task = asyncio.create_task(controller._summary_loop(memo))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if calls.count(("ns", "a")) >= 3:
                break
        task.cancel()
        assert memo.queue.failures(("ns", "a")) == 0  # forgotten once it succeeded

    asyncio.run(run())
    assert calls.count(("ns", "a")) == 3  # 503, a bug, then written
    assert calls.count(("ns", "b")) == 1  # the burst was one summary
