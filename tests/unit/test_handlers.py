"""The agent's kopf layer without a running kopf: the snapshots and keys track_objects queues,
what one step does with an object (reconcile it through Resync when it selects this node,
remove this node's entry when it no longer does), and how the workers queue its next look."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from types import SimpleNamespace
from typing import Any

import kopf
import pytest
from prometheus_client import REGISTRY

from imageunlock.agent import handlers
from imageunlock.agent.node import NodeAgent
from imageunlock.engine.models import Phase
from imageunlock.errors import ConfigurationError, KubernetesUnavailableError
from imageunlock.workqueue import WorkQueue

from ..support.fakes import FakeKubernetesApi

KEY = ("ns", "iu")
NODE = "edge-1"


class FakeResync:
    def __init__(self) -> None:
        self.steps: list[tuple[tuple[str, str], dict[str, Any]]] = []
        self.forgotten: list[tuple[str, str]] = []
        self.error: Exception | None = None
        self.next_look = 300.0
        self.poked: list[tuple[str, str]] = []

    def step(self, key: tuple[str, str], body: dict[str, Any]) -> float:
        if self.error is not None:
            raise self.error
        self.steps.append((key, body))
        return self.next_look

    def forget(self, key: tuple[str, str]) -> None:
        self.forgotten.append(key)

    def poke(self, key: tuple[str, str]) -> None:
        self.poked.append(key)


class FakeSecrets:
    """SecretWatches without threads: what the agent asked to follow."""

    def __init__(self) -> None:
        self.wanted: set[tuple[str, str]] = set()

    def sync(self, wanted: set[tuple[str, str]]) -> None:
        self.wanted = set(wanted)


class FakeReconciler:
    """The Reconciler as far as the handlers go: parse, and the kept keys each revocation drops."""

    def __init__(self) -> None:
        self.released: list[tuple[str, str, dict[str, Any] | None]] = []
        self.secrets_changed: list[tuple[str, str]] = []
        self.kept: set[tuple[str, str]] = set()  # Secrets a kept key was fetched with

    def parse(self, body: dict[str, Any]) -> SimpleNamespace:
        return parse(body)

    def release_keys(self, namespace: str, name: str, body: dict[str, Any] | None) -> None:
        self.released.append((namespace, name, body))

    def secret_changed(self, namespace: str, secret: str) -> None:
        self.secrets_changed.append((namespace, secret))

    def keeps_keys(self, namespace: str, secret: str) -> bool:
        return (namespace, secret) in self.kept


def parse(body: dict[str, Any]) -> SimpleNamespace:
    """Reconciler.parse, as far as the Secret goes: the name under spec.resourceApi."""
    ref = ((body.get("spec") or {}).get("resourceApi") or {}).get("credentialsSecretRef") or {}
    if not ref:
        raise ConfigurationError("no key source")
    return SimpleNamespace(key_source=SimpleNamespace(secret_name=ref["name"]))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def raw(
    phase: str | None = None, selector: dict[str, Any] | None = None, reason: str | None = None, **meta: Any
) -> dict[str, Any]:
    entry = {"name": NODE, "phase": phase, "observedGeneration": 1, **({"reason": reason} if reason else {})}
    status = {"nodes": [entry]} if phase else {}
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
    clock = Clock()
    return SimpleNamespace(
        kube=kube,
        agent=NodeAgent(kube, NODE, "docker"),
        resync=FakeResync(),
        reconciler=FakeReconciler(),
        secrets=FakeSecrets(),
        secret_of={},
        objects={},
        clock=clock,
        queue=WorkQueue(clock=clock),
    )


def test_a_selecting_object_goes_to_resync_and_this_nodes_entry_says_where_it_stands():
    memo = memo_with()
    body = raw("Ready", selector={"matchLabels": {"role": "edge"}})
    handlers._step(memo, KEY, body)
    [(key, seen)] = memo.resync.steps
    assert key == KEY and seen is body
    entry = memo.agent.entry(seen)
    assert (entry.name, entry.phase, entry.observed_generation) == (NODE, Phase.READY, 1)


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


# -- track_objects -------------------------------------------------------------------------


def track(memo: SimpleNamespace, event_type: str, body: dict[str, Any]) -> None:
    asyncio.run(handlers.track_objects(event={"type": event_type, "object": body}, body=kopf.Body(body), memo=memo))


def test_track_objects_keeps_the_latest_snapshot_of_each_object_and_queues_its_key_once():
    memo = memo_with()
    track(memo, "ADDED", raw("Loading"))
    track(memo, "MODIFIED", raw("Ready"))
    track(memo, "ADDED", raw(name="other"))
    assert set(memo.objects) == {KEY, ("ns", "other")}
    assert memo.objects[KEY]["status"]["nodes"][0]["phase"] == "Ready"
    assert set(memo.objects[KEY]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert [memo.queue.ready(), memo.queue.ready(), memo.queue.ready()] == [KEY, ("ns", "other"), None]


def test_a_deleted_object_is_dropped_and_its_step_forgets_its_schedule():
    memo = memo_with()
    track(memo, "ADDED", raw("Ready"))
    track(memo, "DELETED", raw("Ready"))
    assert KEY not in memo.objects and memo.resync.forgotten == []  # not while a step of it may run
    handle(memo)
    assert memo.resync.forgotten == [KEY] and memo.resync.steps == []
    assert memo.reconciler.released == [(*KEY, None)]  # its kept keys went with it


def test_an_object_that_no_longer_selects_this_node_releases_its_kept_keys():
    memo = memo_with({"role": "spare"})
    handlers._step(memo, KEY, raw("Ready", selector={"matchLabels": {"role": "edge"}}))
    assert memo.reconciler.released == [(*KEY, None)]


def test_the_condition_gauge_follows_this_nodes_entry_and_has_none_without_one():
    """Defect: an unselected node exported Ready=Unknown 1 for every ImageUnlock."""
    memo = memo_with()

    def ready(status: str) -> float | None:
        labels = {"namespace": KEY[0], "name": KEY[1], "node": NODE, "condition": "Ready", "status": status}
        return REGISTRY.get_sample_value("imageunlock_status_condition", labels)

    track(memo, "ADDED", raw())  # no entry of this node (yet)
    assert ready("Unknown") is None and ready("False") is None
    track(memo, "MODIFIED", raw("Ready"))
    assert ready("True") == 1 and ready("Unknown") == 0
    track(memo, "MODIFIED", raw())  # the entry went (deselected)
    assert ready("True") is None


def test_track_objects_drops_an_object_that_is_being_deleted():
    memo = memo_with()
    track(memo, "ADDED", raw("Ready"))
    track(memo, "MODIFIED", raw("Ready", deletionTimestamp="2026-01-01T00:00:00Z"))
    assert KEY not in memo.objects


def test_the_secrets_of_objects_this_node_serves_are_followed_and_a_change_queues_them():
    """Issue 21, item 5: a created or changed Secret re-checks the ImageUnlocks naming it."""
    memo = memo_with()
    memo.agent.observe(memo.kube.nodes[NODE])  # the Node's watch reported: selection is known

    def naming(secret: str, namespace: str = KEY[0], name: str = KEY[1], **spec: Any) -> dict[str, Any]:
        body = raw("Failed", reason="AuthenticationFailed", **spec)
        body["metadata"].update(namespace=namespace, name=name)
        body["spec"]["resourceApi"] = {"credentialsSecretRef": {"name": secret}}
        return body

    named = naming("creds")
    other = naming("creds", namespace="other", name="x")
    elsewhere = naming("spare-creds", name="elsewhere", selector={"matchLabels": {"role": "spare"}})
    track(memo, "ADDED", named)
    track(memo, "ADDED", other)
    track(memo, "ADDED", elsewhere)
    # each Secret in its ImageUnlock's own namespace; none for an object this node does not serve
    assert memo.secrets.wanted == {("ns", "creds"), ("other", "creds")}
    while (drained := memo.queue.ready()) is not None:
        memo.queue.done(drained)
    handlers._secret_changed(memo, ("ns", "creds"))
    assert memo.resync.poked == [KEY] and memo.queue.ready() == KEY
    assert memo.reconciler.secrets_changed == [("ns", "creds")]  # the keys fetched with it: revoked
    track(memo, "DELETED", named)
    assert memo.secrets.wanted == {("other", "creds")}


def test_only_secrets_an_object_waits_for_or_a_kept_key_came_from_are_followed():
    """A watch (a thread, and a watch on the API server) per Secret named by any object was
    unbounded; a Ready object needs none, nor one not yet tried (its first step reads the
    Secret). Stalled or retrying on credentials or a missing Secret: followed. Ready with a key
    kept from its Secret: followed, so a rotation revokes the key at once."""
    memo = memo_with()
    memo.agent.observe(memo.kube.nodes[NODE])

    def body(name: str, phase: str | None, reason: str | None = None) -> dict[str, Any]:
        b = raw(phase, reason=reason, name=name)
        b["spec"]["resourceApi"] = {"credentialsSecretRef": {"name": f"creds-{name}"}}
        return b

    track(memo, "ADDED", body("ready", "Ready"))
    track(memo, "ADDED", body("new", None))
    track(memo, "ADDED", body("busy", "Failed", "ArchiveBusy"))  # retrying on something else
    assert memo.secrets.wanted == set()
    track(memo, "ADDED", body("missing", "Failed", "InvalidConfiguration"))  # e.g. the Secret is missing
    track(memo, "ADDED", body("refused", "Failed", "AuthenticationFailed"))
    assert memo.secrets.wanted == {("ns", "creds-missing"), ("ns", "creds-refused")}
    track(memo, "MODIFIED", body("missing", "Ready"))  # fixed: no longer followed
    assert memo.secrets.wanted == {("ns", "creds-refused")}
    memo.reconciler.kept.add(("ns", "creds-ready"))
    handlers._refresh_secrets(memo)
    assert memo.secrets.wanted == {("ns", "creds-refused"), ("ns", "creds-ready")}


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


# -- the workers ----------------------------------------------------------------------------


def handle(memo: SimpleNamespace) -> None:
    """What a worker does with the next key the queue hands out."""

    async def run() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as memo.workers:
            await handlers._handle(memo, memo.queue.ready())

    asyncio.run(run())


def test_the_next_look_resync_asks_for_is_queued_after_that_delay():
    memo = memo_with()
    memo.objects[KEY] = raw("Ready")
    memo.queue.add(KEY)
    handle(memo)
    assert len(memo.resync.steps) == 1
    memo.clock.now += 299.9
    assert memo.queue.ready() is None  # an idle object: nothing until its next look
    memo.clock.now += 0.1
    assert memo.queue.ready() == KEY


def test_an_object_left_alone_is_queued_again_only_when_it_changes():
    memo = memo_with({"role": "spare"})
    memo.objects[KEY] = raw(selector={"matchLabels": {"role": "edge"}})  # not this node's
    memo.queue.add(KEY)
    handle(memo)
    memo.clock.now += 3600
    assert memo.queue.ready() is None
    track(memo, "MODIFIED", raw("Ready", selector={"matchLabels": {"role": "spare"}}))
    handle(memo)
    assert len(memo.resync.steps) == 1


def test_a_failed_step_is_logged_and_tried_again_after_a_growing_backoff_until_it_succeeds(caplog):
    caplog.set_level(logging.INFO, logger="imageunlock.agent.handlers")
    memo = memo_with()
    memo.objects[KEY] = raw("Ready")
    memo.resync.error = KubernetesUnavailableError("writing status failed (HTTP 503)")
    memo.queue.add(KEY)
    handle(memo)
    assert "not handled now: writing status failed" in caplog.text
    memo.resync.error = RuntimeError("a bug")
    memo.clock.now += 1.2  # the first backoff: 1 s +- 20 %
    handle(memo)
    assert "handling ns/iu failed" in caplog.text and memo.queue.failures(KEY) == 2
    memo.clock.now += 1.5
    assert memo.queue.ready() is None  # the second: 2 s +- 20 %
    memo.clock.now += 1.0
    memo.resync.error = None
    memo.queue.add(KEY)
    handle(memo)
    assert len(memo.resync.steps) == 1 and memo.queue.failures(KEY) == 0  # forgotten on success


def test_the_workers_step_each_key_as_it_is_queued():
    """The running pieces together: worker tasks, the queue and the worker threads."""

    async def run() -> list[tuple[str, str]]:
        memo = memo_with()
        memo.queue = WorkQueue()
        memo.objects[KEY] = raw("Ready")
        memo.objects[("ns", "other")] = raw("Ready", name="other")
        with concurrent.futures.ThreadPoolExecutor(2) as memo.workers:
            workers = [asyncio.create_task(handlers._worker(memo)) for _ in range(2)]
            handlers._all_changed(memo)  # as the Node watch does
            while len(memo.resync.steps) < 2:
                await asyncio.sleep(0.01)
            for worker in workers:
                worker.cancel()
        return sorted(key for key, _ in memo.resync.steps)

    assert asyncio.run(asyncio.wait_for(run(), 10)) == [KEY, ("ns", "other")]


def test_a_deleted_object_gives_its_images_its_own_reclaim_policy(tmp_path):
    """Issue 20: the deleted event's last state carries the policy (no finalizer is needed)."""
    from imageunlock.agent.reclaim import Reclaimer

    from ..support.fakes import FakeRuntime

    memo = memo_with()
    memo.runtime = FakeRuntime({"azaion/x:2.0": "sha256:x"})
    memo.runtime.owners["docker.io/azaion/x:2.0"] = ("ns/iu", "sha256:x")
    memo.reclaimer = Reclaimer(memo.runtime, memo.kube, NODE, memo.agent.entry, directory=str(tmp_path))
    memo.deleted = {}
    body = raw("Ready")
    body["spec"]["reclaimPolicy"] = "Delete"
    track(memo, "ADDED", body)
    handle(memo)
    track(memo, "DELETED", body)
    handle(memo)
    assert memo.runtime.images == {} and memo.deleted == {}
    assert [e.message for e in memo.kube.events] == [f"node {NODE}: removed 1 image(s) of 2.0"]
