"""Node selection, agent placement, runtimes from Nodes, and the per-node entry (issue 11)."""

from __future__ import annotations

import pytest

from imageunlock.engine.models import Phase
from imageunlock.errors import ConfigurationError
from imageunlock.kube.models import Image, NodeEntry
from imageunlock.kube.nodes import (
    DETAILED_NODES,
    NodeInfo,
    Placement,
    compacted,
    find_entry,
    images_digest,
    large_fleet,
    parse_selector,
    runtime_of,
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


def test_find_entry_reads_this_nodes_entry_typed():
    status = {
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
    }
    entry = find_entry(status, "edge-1")
    assert entry == NodeEntry(
        name="edge-1",
        phase=Phase.FAILED,
        reason="AuthenticationFailed",
        observed_generation=2,
        images=[Image(name="a/b:1", id="sha256:1")],
    )
    assert find_entry(status, "new-node") is None and find_entry(None, "edge-1") is None


def test_on_a_large_fleet_a_ready_entry_keeps_the_digest_and_trusts_only_a_list_with_that_digest():
    images = [Image(name="a/b:1", id="sha256:1")]
    done = NodeEntry(name="n", phase=Phase.READY, observed_generation=3, images=images)
    small = compacted(done)
    assert small.images is None and small.images_digest == images_digest(images)
    failed = NodeEntry(name="n", phase=Phase.FAILED, images=images)
    assert compacted(failed) == failed  # only a Ready entry's list is vouched for by its digest
    listed = [{"name": "a/b:1", "id": "sha256:1", "present": True}]
    assert find_entry({"images": listed, "nodes": [small.dump()]}, "n") == done
    # Review finding 2: a summary listing another node's IDs is not taken for this node's
    other = [{"name": "a/b:1", "id": "sha256:arm", "present": True}]
    assert find_entry({"images": other, "nodes": [small.dump()]}, "n") == small
    assert find_entry({"nodes": [small.dump()]}, "n") == small


def test_on_a_large_fleet_what_was_reclaimed_keeps_its_count_not_its_lists():
    """Issue 20: 1000 entries each listing 7 refs would near the object's size limit."""
    reclaimed = {"policy": "Delete", "version": "1", "count": 2, "refs": ["a/b:1", "a/c:1"], "kept": ["a/d:1"]}
    entry = NodeEntry(name="n", phase=Phase.FAILED, reclaimed={**reclaimed, "time": "2026-01-01T00:00:00Z"})
    small = compacted(entry).reclaimed
    assert small is not None and (small.count, small.refs, small.kept, small.policy) == (2, None, None, "Delete")


def test_only_a_large_fleet_compacts():
    assert large_fleet({"nodesDesired": DETAILED_NODES + 1}) and not large_fleet({"nodesDesired": DETAILED_NODES})
    assert not large_fleet(None)


def test_the_daemonsets_own_tolerations_count_for_the_placement():
    """Review finding 11: a cordoned or not-ready node still runs its agent."""
    cordoned = NodeInfo("c", {}, ({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},))
    assert Placement().runs_agent(cordoned)
