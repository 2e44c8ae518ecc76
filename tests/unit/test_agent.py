"""One node's agent (issue 11): the runtime it loads into, how it reads its Node, and how it
writes only its own entry (applied whole, the start of the next, removed when deselected)."""

from __future__ import annotations

import pytest

from imageunlock.agent.node import NodeAgent, counted, resolve_runtime
from imageunlock.engine.models import Phase
from imageunlock.errors import ConfigurationError, KubernetesUnavailableError
from imageunlock.kube.conditions import mark_ready, mark_reconciling
from imageunlock.kube.models import Image, NodeEntry
from imageunlock.kube.nodes import DETAILED_NODES, MAX_NODES, NodeInfo

from ..support.fakes import FakeKubernetesApi

KEY = ("ns", "iu")
IMAGES = [Image(name="a/b:1", id="sha256:1")]


def unlocked(entry: NodeEntry, generation: int, **fields: object) -> NodeEntry:
    """``entry`` as a reconcile that verified IMAGES leaves it."""
    done = mark_ready(entry, "Unlocked", "1 image(s) loaded and verified", generation)
    return done.model_copy(update={"images": IMAGES, **fields})


def body(uid: str = "u1", generation: int = 2, **status: object) -> dict:
    return {"metadata": {"namespace": "ns", "name": "iu", "uid": uid, "generation": generation}, "status": status}


def test_auto_is_the_runtime_the_node_reports_and_a_setting_wins():
    assert resolve_runtime("auto", NodeInfo("n", runtime="containerd"), "n") == "containerd"
    assert resolve_runtime("docker", NodeInfo("n", runtime="containerd"), "n") == "docker"
    assert resolve_runtime("containerd", None, "n") == "containerd"


@pytest.mark.parametrize(("node", "expected"), [(None, "not found"), (NodeInfo("n"), "reports no runtime")])
def test_auto_without_an_answer_says_what_to_set(node, expected):
    with pytest.raises(ConfigurationError, match=expected) as info:
        resolve_runtime("auto", node, "n")
    assert "IMAGEUNLOCK_RUNTIME" in info.value.message


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_node_is_reread_after_the_refresh_interval_and_an_outage_keeps_the_last_answer():
    kube, clock = FakeKubernetesApi(), Clock()
    kube.nodes["n"] = {"metadata": {"name": "n", "labels": {"role": "edge"}}}
    agent = NodeAgent(kube, "n", "docker", refresh=5, clock=clock)
    assert agent.node_info() == NodeInfo("n", {"role": "edge"})
    kube.nodes["n"]["metadata"]["labels"] = {"role": "spare"}
    assert agent.node_info().labels == {"role": "edge"}  # cached
    clock.now += 5
    assert agent.node_info().labels == {"role": "spare"}

    def down(name):
        raise KubernetesUnavailableError("reading Node n failed (HTTP 503)")

    kube.read_node = down
    clock.now += 5
    assert agent.node_info().labels == {"role": "spare"}


def test_an_entry_starts_from_the_objects_and_is_applied_whole_leaving_the_others():
    kube = FakeKubernetesApi()
    kube.statuses[KEY] = {"nodes": [{"name": "other", "phase": "Ready"}]}
    agent = NodeAgent(kube, "n", "containerd")
    seen = body(nodes=[{"name": "n", "phase": "Ready", "lastUnlockTime": "T0", "observedGeneration": 1}])
    restarted = agent.entry(seen)  # an agent restarted: it goes on from what its entry says
    assert (restarted.last_unlock_time, restarted.runtime) == ("T0", "containerd")
    agent.apply(seen, mark_reconciling(restarted, Phase.LOADING, "Loading", "decrypting", 2))
    agent.apply(seen, unlocked(agent.entry(seen), 2, last_unlock_time="T1"))
    nodes = {e["name"]: e for e in kube.statuses[KEY]["nodes"]}
    assert nodes["other"] == {"name": "other", "phase": "Ready"}
    assert nodes["n"] == {
        "name": "n",
        "runtime": "containerd",
        "phase": "Ready",
        "reason": "Unlocked",
        "message": "1 image(s) loaded and verified",
        "observedGeneration": 2,
        "images": [{"name": "a/b:1", "id": "sha256:1"}],
        "lastUnlockTime": "T1",
    }
    # every apply carries the whole entry (a field left out of an apply is dropped by the server)
    assert [written["lastUnlockTime"] for _, _, written in kube.entry_writes] == ["T0", "T1"]
    assert agent.entry(seen).phase is Phase.READY  # what it applied, before the watch shows it


def test_leaving_removes_only_this_nodes_entry():
    kube = FakeKubernetesApi()
    kube.statuses[KEY] = {"nodes": [{"name": "other"}, {"name": "n"}]}
    agent = NodeAgent(kube, "n", "docker")
    assert agent.has_entry(KEY, {"status": kube.statuses[KEY]})
    agent.leave(*KEY)
    assert kube.statuses[KEY]["nodes"] == [{"name": "other"}]
    assert not agent.has_entry(KEY, {"status": kube.statuses[KEY]})


def test_past_the_node_limit_an_agent_writes_no_entry():
    kube = FakeKubernetesApi()
    kube.nodes["n"] = {"metadata": {"name": "n"}}
    agent = NodeAgent(kube, "n", "docker")
    assert agent.selected({"spec": {}, "status": {"nodesDesired": MAX_NODES}})
    assert not agent.selected({"spec": {}, "status": {"nodesDesired": MAX_NODES + 1}})


def test_on_a_large_fleet_the_agent_writes_a_digest_and_remembers_what_it_verified():
    kube = FakeKubernetesApi()
    agent = NodeAgent(kube, "n", "docker", NodeInfo("n"))
    large = body(nodesDesired=DETAILED_NODES + 1)
    agent.apply(large, unlocked(agent.entry(large), 2))
    [mine] = kube.statuses[KEY]["nodes"]
    assert "images" not in mine and mine["imagesDigest"].startswith("sha256:")
    # Review finding 1: with no list in the summary, the agent's own memory still counts
    assert agent.entry(body(nodesDesired=DETAILED_NODES + 1, nodes=[mine])).images == IMAGES
    assert agent.entry(large).images == IMAGES


def test_an_object_created_anew_under_the_same_name_starts_afresh():
    """Review finding 4: nothing of the deleted object's entry or verified images carries over."""
    kube = FakeKubernetesApi()
    agent = NodeAgent(kube, "n", "docker", NodeInfo("n"))
    old = body(uid="old", generation=1)
    agent.apply(old, unlocked(agent.entry(old), 1, last_unlock_time="T0"))
    # no DELETED seen (a watch that reconnected past it): only the uid tells the objects apart
    new = body(uid="new", generation=1)
    assert agent.entry(new) == NodeEntry(name="n", runtime="docker")
    agent.apply(new, mark_reconciling(agent.entry(new), Phase.PENDING, "Pending", "starting", 1))
    [mine] = kube.statuses[KEY]["nodes"]
    assert "lastUnlockTime" not in mine and "observedGeneration" not in mine and "images" not in mine


def test_a_failed_first_read_of_the_node_says_nothing_and_a_deleted_node_selects_nothing():
    """Review finding 5: an agent must not drop its entries because one Node read failed."""
    kube = FakeKubernetesApi()

    def down(name):
        raise KubernetesUnavailableError("reading Node n failed (HTTP 429)")

    kube.read_node = down
    agent = NodeAgent(kube, "n", "docker")
    assert agent.selected({"spec": {}}) is None
    kube.read_node = lambda name: None  # 404: deleted
    agent.refresh = 0
    assert agent.selected({"spec": {}}) is False


def test_a_generation_starts_only_once_the_controller_counted_its_nodes():
    """Review finding 12: past MAX_NODES no agent may start, not even before the summary lands."""
    meta = {"generation": 3}
    assert not counted({"metadata": meta, "status": {}})
    assert not counted({"metadata": meta, "status": {"observedGeneration": 2, "nodesDesired": 5}})
    assert counted({"metadata": meta, "status": {"observedGeneration": 3, "nodesDesired": 5}})
    assert not counted({"metadata": meta, "status": {"observedGeneration": 3, "nodesDesired": MAX_NODES + 1}})


def test_a_watched_node_is_never_read_again_and_follows_what_the_watch_reports():
    """Issue 22, item 1: the watch keeps the Node current; an idle agent reads nothing."""
    kube, clock = FakeKubernetesApi(), Clock()
    kube.nodes["n"] = {"metadata": {"name": "n", "labels": {"role": "edge"}}}

    def no_read(name):
        raise AssertionError("the Node was read although a watch reports it")

    agent = NodeAgent(kube, "n", "docker", refresh=5, clock=clock)
    agent.observe({"metadata": {"name": "n", "labels": {"role": "edge"}}})
    kube.read_node = no_read
    clock.now += 3600
    assert agent.node_info() == NodeInfo("n", {"role": "edge"})
    agent.observe({"metadata": {"name": "n", "labels": {"role": "spare"}}})
    assert agent.selected({"spec": {"nodeSelector": {"matchLabels": {"role": "edge"}}}}) is False
    agent.observe(None)  # deleted
    assert agent.node_info() is None and agent.selected({"spec": {}}) is False


def test_only_a_change_the_agent_acts_on_queues_its_objects_and_disk_pressure_is_one():
    """Issue 20, item 2: the DiskPressure condition's transitions are reported (a held import
    starts when it clears); a heartbeat that changes nothing the agent reads is not."""
    agent = NodeAgent(FakeKubernetesApi(), "n", "docker")

    def node(pressure: str, heartbeat: str = "T0") -> dict:
        conditions = [
            {"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat},
            {"type": "DiskPressure", "status": pressure, "lastHeartbeatTime": heartbeat},
        ]
        return {"metadata": {"name": "n", "labels": {"role": "edge"}}, "status": {"conditions": conditions}}

    assert agent.observe(node("False")) is True  # the first report
    assert agent.observe(node("False", heartbeat="T1")) is False and not agent.disk_pressure()
    assert agent.observe(node("True")) is True and agent.disk_pressure()
    assert agent.observe(node("True", heartbeat="T2")) is False
    assert agent.observe(node("False")) is True and not agent.disk_pressure()
    assert agent.observe(None) is True and not agent.disk_pressure()  # deleted
