"""One node's agent (issue 11): the runtime it loads into, how it reads its Node, and how it
writes only its own entry (merged, applied whole, removed when deselected)."""

from __future__ import annotations

import pytest

from imageunlock.agent.node import NodeAgent, counted, resolve_runtime
from imageunlock.engine.models import Phase
from imageunlock.errors import ConfigurationError, KubernetesUnavailableError
from imageunlock.kube.conditions import ready, working
from imageunlock.kube.nodes import DETAILED_NODES, MAX_NODES, NodeInfo

from ..support.fakes import FakeKubernetesApi

KEY = ("ns", "iu")


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


def test_writes_merge_into_this_nodes_entry_and_leave_the_others():
    kube = FakeKubernetesApi()
    kube.statuses[KEY] = {"nodes": [{"name": "other", "phase": "Ready"}]}
    agent = NodeAgent(kube, "n", "containerd")
    body = {"status": {"nodes": [{"name": "n", "phase": "Ready", "lastUnlockTime": "T0", "observedGeneration": 1}]}}
    agent.seed(KEY, body)  # an agent restarted: it keeps what its entry said
    agent.write(*KEY, working(Phase.LOADING, "decrypting", 2, None, 1, 4))
    agent.write(*KEY, ready({"a/b:1": "sha256:1"}, False, 2, None, 4, unlocked_at="T1"))
    nodes = {e["name"]: e for e in kube.statuses[KEY]["nodes"]}
    assert nodes["other"] == {"name": "other", "phase": "Ready"}
    mine = nodes["n"]
    assert mine["runtime"] == "containerd" and mine["phase"] == "Ready" and mine["observedGeneration"] == 2
    assert mine["lastUnlockTime"] == "T1" and mine["images"] == [{"name": "a/b:1", "id": "sha256:1"}]
    # every apply carries the whole entry (a field left out of an apply is dropped by the server)
    assert all(written is not None and written["name"] == "n" for _, _, written in kube.entry_writes)
    assert kube.entry_writes[0][2]["lastUnlockTime"] == "T0"


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
    body = {
        "metadata": {"namespace": "ns", "name": "iu", "uid": "u1", "generation": 2},
        "status": {"nodesDesired": DETAILED_NODES + 1},
    }
    agent.seed(KEY, body)
    agent.write(*KEY, ready({"a/b:1": "sha256:1"}, False, 2, None))
    [mine] = kube.statuses[KEY]["nodes"]
    assert "images" not in mine and mine["imagesDigest"].startswith("sha256:")
    seen = agent.view({**body, "status": {**body["status"], "nodes": [mine]}})  # no list in the summary
    assert seen["status"]["images"] == [{"name": "a/b:1", "id": "sha256:1", "present": True}]


def test_an_object_created_anew_under_the_same_name_starts_afresh():
    """Review finding 4: nothing of the deleted object's entry or verified images carries over."""
    kube = FakeKubernetesApi()
    agent = NodeAgent(kube, "n", "docker", NodeInfo("n"))
    old = {"metadata": {"namespace": "ns", "name": "iu", "uid": "old", "generation": 1}, "status": {}}
    agent.seed(KEY, old)
    agent.write(*KEY, ready({"a/b:1": "sha256:1"}, False, 1, None, unlocked_at="T0"))
    # no DELETED seen (a watch that reconnected past it): only the uid tells the objects apart
    new = {"metadata": {"namespace": "ns", "name": "iu", "uid": "new", "generation": 1}, "status": {}}
    agent.seed(KEY, new)
    assert "images" not in agent.view(new)["status"]
    agent.write(*KEY, working(Phase.PENDING, "starting", 1, None))
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
