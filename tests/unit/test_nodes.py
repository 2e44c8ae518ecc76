"""Node selection, agent placement, runtimes from Nodes, and the per-node entry (issue 11)."""

from __future__ import annotations

import pytest

from imageunlock.engine.models import Phase
from imageunlock.errors import ConfigurationError
from imageunlock.kube.conditions import ready, retrying, stalled, working
from imageunlock.kube.nodes import (
    DETAILED_NODES,
    NodeInfo,
    Placement,
    compact,
    images_digest,
    merge_entry,
    parse_selector,
    runtime_of,
    view,
)

LABELS = {"role": "edge", "zone": "north", "kubernetes.io/arch": "arm64"}


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        (None, True),
        ({}, True),
        ({"matchLabels": {"role": "edge"}}, True),
        ({"matchLabels": {"role": "edge", "zone": "south"}}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["north", "east"]}]}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["north"]}]}, False),
        ({"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["none"]}]}, True),
        ({"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, True),
        (
            {"matchLabels": {"role": "edge"}, "matchExpressions": [{"key": "zone", "operator": "In", "values": ["x"]}]},
            False,
        ),
    ],
)
def test_label_selectors_select_as_kubernetes_does(selector, selected):
    assert parse_selector(selector).matches(LABELS) is selected


def test_every_problem_of_a_selector_is_named_at_once():
    with pytest.raises(ConfigurationError) as info:
        parse_selector(
            {
                "matchLabels": {"bad key!": "x", "role": "not a value"},
                "matchExpressions": [
                    {"key": "zone", "operator": "Near", "values": ["x"]},
                    {"key": "zone", "operator": "In"},
                    {"key": "zone", "operator": "Exists", "values": ["x"]},
                ],
            }
        )
    message = info.value.message
    for part in ("'bad key!'", "'not a value'", "'Near'", "operator In needs at least one value", "takes no values"):
        assert part in message


@pytest.mark.parametrize(
    ("version", "runtime"),
    [("containerd://1.7.3", "containerd"), ("docker://24.0.7", "docker"), ("cri-o://1.30", None), ("", None)],
)
def test_the_runtime_comes_from_kubelets_container_runtime_version(version, runtime):
    assert runtime_of(version) == runtime


def test_a_node_object_gives_name_labels_taints_and_runtime():
    node = NodeInfo.from_object(
        {
            "metadata": {"name": "edge-1", "labels": {"role": "edge"}},
            "spec": {"taints": [{"key": "edge", "effect": "NoSchedule"}]},
            "status": {"nodeInfo": {"containerRuntimeVersion": "containerd://2.1.4"}},
        }
    )
    assert (node.name, dict(node.labels), node.runtime) == ("edge-1", {"role": "edge"}, "containerd")
    assert node.taints == ({"key": "edge", "effect": "NoSchedule"},)


def test_agents_run_where_the_daemonsets_selector_and_tolerations_allow():
    control_plane = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
    edge = {"key": "azaion.com/edge", "value": "true", "effect": "NoExecute"}
    soft = {"key": "busy", "effect": "PreferNoSchedule"}
    placement = Placement({"role": "edge"}, ({"key": "azaion.com/edge", "operator": "Equal", "value": "true"},))
    assert placement.runs_agent(NodeInfo("a", {"role": "edge"}, (edge, soft)))
    assert not placement.runs_agent(NodeInfo("b", {"role": "edge"}, (control_plane,)))
    assert not placement.runs_agent(NodeInfo("c", {"role": "cloud"}))
    everywhere = Placement({}, ({"operator": "Exists"},))
    assert everywhere.runs_agent(NodeInfo("d", {}, (control_plane, edge)))
    by_key = Placement(
        {}, ({"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"},)
    )
    assert by_key.runs_agent(NodeInfo("e", {}, (control_plane,))) and not by_key.runs_agent(NodeInfo("f", {}, (edge,)))


def test_an_entry_folds_the_reconcilers_status_updates_and_stays_small():
    entry = merge_entry(None, "edge-1", "docker", working(Phase.LOADING, "decrypting", 3, None, 50, 100))
    assert entry == {
        "name": "edge-1",
        "runtime": "docker",
        "phase": "Loading",
        "reason": "Loading",
        "message": "decrypting",
        "progress": {"bytesDone": 50, "bytesTotal": 100, "percent": 50},
    }
    done = merge_entry(
        entry, "edge-1", "docker", {**ready({"a/b:1": "sha256:1"}, False, 3, None, 100), "lastVerifiedTime": "T"}
    )
    assert done["phase"] == "Ready" and done["reason"] == "Unlocked" and done["observedGeneration"] == 3
    assert done["images"] == [{"name": "a/b:1", "id": "sha256:1"}] and "progress" not in done
    assert "conditions" not in done and done["lastVerifiedTime"] == "T"
    failed = merge_entry(done, "edge-1", "docker", stalled("ArchiveNotFound", "no archive", 4, None))
    assert failed["phase"] == "Failed" and failed["reason"] == "ArchiveNotFound" and "images" not in failed
    again = merge_entry(failed, "edge-1", "docker", retrying("RuntimeUnavailable", "down", 1, 5, 4, None))
    assert again["reason"] == "RuntimeUnavailable" and again["observedGeneration"] == 4


def test_the_view_shows_this_nodes_entry_as_the_reconciler_reads_a_status():
    body = {
        "metadata": {"name": "iu", "generation": 2},
        "status": {
            "phase": "Pending",
            "nodes": [
                {"name": "other", "phase": "Failed", "observedGeneration": 2},
                {
                    "name": "edge-1",
                    "phase": "Failed",
                    "reason": "AuthenticationFailed",
                    "observedGeneration": 2,
                    "images": [{"name": "a/b:1", "id": "sha256:1"}],
                },
            ],
        },
    }
    status = view(body, "edge-1")["status"]
    assert status["phase"] == "Failed" and status["observedGeneration"] == 2
    assert status["images"] == [{"name": "a/b:1", "id": "sha256:1", "present": True}]
    stalled_condition = next(c for c in status["conditions"] if c["type"] == "Stalled")
    assert stalled_condition == {"type": "Stalled", "status": "True", "reason": "AuthenticationFailed"}
    assert view(body, "new-node")["status"] == {}  # nothing reported yet: a new generation for this node


def test_on_a_large_fleet_a_ready_entry_keeps_the_digest_and_trusts_only_a_list_with_that_digest():
    images = [{"name": "a/b:1", "id": "sha256:1"}]
    done = ready({"a/b:1": "sha256:1"}, False, 3, None)
    small = merge_entry(None, "n", "docker", done, compact=True)
    assert small["imagesDigest"] == images_digest(images) and "images" not in small
    failed = merge_entry(small, "n", "docker", stalled("ArchiveInvalid", "bad", 3, None), compact=True)
    assert "imagesDigest" not in failed and "images" not in failed
    top = {"observedGeneration": 3, "images": [{**images[0], "present": True}], "nodes": [small]}
    assert view({"status": top}, "n")["status"]["images"] == [{**images[0], "present": True}]
    # Review finding 2: a summary listing another node's IDs is not taken for this node's
    other = {**top, "images": [{"name": "a/b:1", "id": "sha256:arm", "present": True}]}
    assert "images" not in view({"status": other}, "n")["status"]
    # Review finding 1: with the summary's list gone, the agent's own memory still counts
    assert view({"status": {**top, "images": None}}, "n", remembered=images)["status"]["images"][0]["id"] == "sha256:1"
    assert (
        "images" not in view({"status": {**top, "images": None}}, "n", remembered=[{"name": "x", "id": "y"}])["status"]
    )


def test_only_a_large_fleet_compacts():
    assert compact({"nodesDesired": DETAILED_NODES + 1}) and not compact({"nodesDesired": DETAILED_NODES})
    assert not compact(None)


def test_the_daemonsets_own_tolerations_count_for_the_placement():
    """Review finding 11: a cordoned or not-ready node still runs its agent."""
    cordoned = NodeInfo("c", {}, ({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},))
    assert Placement().runs_agent(cordoned)
