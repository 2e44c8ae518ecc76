"""The controller's cluster summary (issue 11): Ready only when every selected node is,
Stalled naming the stuck node, Reconciling while any works, NODES ready/desired, and the
entries to prune."""

from __future__ import annotations

from typing import Any

from imageunlock.controller.summary import summarize
from imageunlock.kube.models import Image
from imageunlock.kube.nodes import MAX_NODES, NodeInfo, Placement, images_digest

EVERYWHERE = Placement()
NODES = [NodeInfo("a", {"role": "edge"}), NodeInfo("b", {"role": "edge"}), NodeInfo("c", {"role": "cloud"})]
IMAGES = [{"name": "azaion/x:1", "id": "sha256:1"}]


def digest_of(images: list[dict[str, str]]) -> str:
    return images_digest([Image.model_validate(i) for i in images])


def entry(name: str, phase: str = "Ready", generation: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "phase": phase,
        "observedGeneration": generation,
        "reason": "Unlocked",
        "images": IMAGES,
        **extra,
    }


def body(*entries: dict[str, Any], generation: int = 1, selector: Any = None, conditions: Any = None) -> dict[str, Any]:
    spec = {"nodeSelector": selector} if selector is not None else {}
    status: dict[str, Any] = {"nodes": list(entries)}
    if conditions is not None:
        status["conditions"] = conditions
    return {"metadata": {"name": "iu", "namespace": "ns", "generation": generation}, "spec": spec, "status": status}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


EDGE = {"matchLabels": {"role": "edge"}}


def test_ready_only_when_every_selected_node_is_ready_for_this_generation():
    result = summarize(
        body(entry("a", lastVerifiedTime="T2"), entry("b", lastVerifiedTime="T1"), selector=EDGE), NODES, EVERYWHERE
    )
    status = result.status
    assert status["phase"] == "Ready" and condition(status, "Ready")["status"] == "True"
    assert (status["readyNodes"], status["nodesReady"], status["nodesDesired"]) == ("2/2", 2, 2)
    assert status["observedGeneration"] == 1 and status["images"] == [{**IMAGES[0], "present": True}]
    assert status["lastVerifiedTime"] == "T1" and status["progress"]["text"] == "100%"
    assert condition(status, "Reconciling")["status"] == "False" and condition(status, "Stalled")["status"] == "False"
    assert result.prune == ()


def test_a_node_that_has_not_reported_keeps_it_reconciling_and_is_named():
    status = summarize(body(entry("a"), selector=EDGE), NODES, EVERYWHERE).status
    assert status["readyNodes"] == "1/2" and condition(status, "Ready")["status"] == "False"
    reconciling = condition(status, "Reconciling")
    assert reconciling["status"] == "True" and "b (no report yet)" in reconciling["message"]
    assert status["phase"] == "Pending" and status["images"] is None


def test_an_entry_of_an_older_generation_is_not_ready():
    status = summarize(
        body(entry("a", generation=2), entry("b", generation=1), generation=2, selector=EDGE), NODES, EVERYWHERE
    ).status
    assert status["readyNodes"] == "1/2" and "b (updating from an earlier generation)" in status["message"]


def test_a_working_node_shows_the_least_advanced_phase_and_its_retry_reason():
    loading = entry("a", "Loading", reason="Loading", message="decrypting", progress={"percent": 40})
    retrying = entry("b", "Pending", reason="ResourceApiUnavailable", message="attempt 1 failed")
    status = summarize(body(loading, retrying, selector=EDGE), NODES, EVERYWHERE).status
    assert status["phase"] == "Pending"
    assert condition(status, "Reconciling")["reason"] == "Loading"  # the first node's reason
    assert status["progress"]["percent"] == 20


def test_one_stalled_node_stalls_the_whole_and_is_named():
    failed = entry("b", "Failed", reason="ArchiveNotFound", message="/var/lib/imageunlock/x.enc does not exist")
    status = summarize(body(entry("a"), failed, selector=EDGE), NODES, EVERYWHERE).status
    stalled = condition(status, "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "ArchiveNotFound"
    assert stalled["message"] == "node b: /var/lib/imageunlock/x.enc does not exist"
    assert status["phase"] == "Failed" and condition(status, "Ready")["status"] == "False"
    assert condition(status, "Reconciling")["status"] == "False" and status["readyNodes"] == "1/2"


def test_stalled_and_still_working_at_once():
    failed = entry("b", "Failed", reason="ArchiveNotFound", message="missing")
    status = summarize(body(entry("a", "Loading"), failed, selector=EDGE), NODES, EVERYWHERE).status
    assert condition(status, "Stalled")["status"] == "True"
    assert condition(status, "Reconciling")["status"] == "True" and "a" in condition(status, "Reconciling")["message"]


def test_entries_of_deselected_or_deleted_nodes_are_pruned():
    result = summarize(body(entry("a"), entry("b"), entry("c"), entry("gone"), selector=EDGE), NODES, EVERYWHERE)
    assert result.prune == ("c", "gone") and result.status["readyNodes"] == "2/2"


def test_the_agents_placement_limits_the_default_selection_but_a_reporting_agent_counts():
    placement = Placement({"role": "edge"})
    assert summarize(body(entry("a")), NODES, placement).status["readyNodes"] == "1/2"
    assert summarize(body(entry("a"), entry("c")), NODES, placement).status["readyNodes"] == "2/3"


def test_selecting_no_node_is_a_user_mistake_but_no_nodes_yet_is_waiting():
    status = summarize(body(selector={"matchLabels": {"role": "moon"}}), NODES, EVERYWHERE).status
    assert condition(status, "Stalled")["reason"] == "NoNodesSelected" and status["readyNodes"] == "0/0"
    status = summarize(body(), [], EVERYWHERE).status
    assert condition(status, "Reconciling")["status"] == "True" and condition(status, "Stalled")["status"] == "False"


def test_an_invalid_selector_stalls_and_prunes_every_entry():
    bad = {"matchExpressions": [{"key": "role", "operator": "Near", "values": ["x"]}]}
    result = summarize(body(entry("a"), selector=bad), NODES, EVERYWHERE)
    assert condition(result.status, "Stalled")["reason"] == "InvalidConfiguration" and result.prune == ("a",)
    assert "'Near'" in result.status["message"]


def test_a_conditions_transition_time_moves_only_when_its_status_changes():
    first = summarize(body(entry("a"), entry("b"), selector=EDGE), NODES, EVERYWHERE, now="T1").status
    again = summarize(
        body(entry("a"), entry("b"), selector=EDGE, conditions=first["conditions"]), NODES, EVERYWHERE, now="T2"
    )
    assert condition(again.status, "Ready")["lastTransitionTime"] == "T1"
    assert again.status == first  # nothing changed: the controller writes nothing


def test_many_stalled_nodes_are_counted_not_all_listed():
    nodes = [NodeInfo(f"n{i}") for i in range(10)]
    failed = [entry(f"n{i}", "Failed", reason="ArchiveNotFound", message="missing") for i in range(10)]
    message = summarize(body(*failed), nodes, EVERYWHERE).status["message"]
    assert message.count("node n") == 3 and "(and 7 more node(s))" in message


def test_more_nodes_than_one_imageunlock_serves_stalls_it_with_advice():
    nodes = [NodeInfo(f"n{i:04d}") for i in range(MAX_NODES + 1)]
    status = summarize(body(), nodes, EVERYWHERE).status
    stalled = condition(status, "Stalled")
    assert stalled["reason"] == "TooManyNodes" and "split the fleet" in stalled["message"]
    assert status["nodesDesired"] == MAX_NODES + 1


def test_digest_entries_keep_the_summarys_list_only_while_it_is_theirs():
    digest = digest_of(IMAGES)
    small = {"name": "a", "phase": "Ready", "observedGeneration": 1, "imagesDigest": digest}
    previous = body({**small}, {**small, "name": "b"}, selector=EDGE)
    previous["status"].update(observedGeneration=1, images=[{**IMAGES[0], "present": True}])
    status = summarize(previous, NODES, EVERYWHERE).status
    assert status["phase"] == "Ready" and status["images"] == [{**IMAGES[0], "present": True}]
    previous["status"]["images"] = [{"name": "azaion/x:1", "id": "sha256:other", "present": True}]
    assert summarize(previous, NODES, EVERYWHERE).status["images"] == []  # not theirs: not vouched for


def test_a_node_at_work_in_the_same_generation_leaves_the_verified_list_alone():
    """Review finding 1: a reload on one node must not wipe the list every other node relies on."""
    previous = body(entry("a"), entry("b", "Loading"), selector=EDGE)
    previous["status"].update(observedGeneration=1, images=[{**IMAGES[0], "present": True}])
    assert "images" not in summarize(previous, NODES, EVERYWHERE).status  # merge patch: kept
    newer = body(entry("a"), entry("b", "Loading"), generation=2, selector=EDGE)
    newer["status"].update(observedGeneration=1, images=[{**IMAGES[0], "present": True}])
    assert summarize(newer, NODES, EVERYWHERE).status["images"] is None  # the last generation's: cleared


def test_a_leftover_entry_beyond_the_placement_is_pruned_not_waited_for():
    """Review finding 6: after the agents' placement narrows, an old entry must not hold a new
    generation back forever."""
    placement = Placement({"role": "edge"})
    old = entry("c", generation=1)
    result = summarize(body(entry("a", generation=2), entry("b", generation=2), old, generation=2), NODES, placement)
    assert result.prune == ("c",) and result.status["readyNodes"] == "2/2"


def test_a_node_still_working_on_a_new_generation_shows_its_phase_and_reason():
    """Its entry's observedGeneration moves only when it finishes: the working phase counts."""
    retrying = entry("a", "Pending", generation=1, reason="ResourceApiUnavailable", message="attempt 2 failed: 503")
    status = summarize(body(retrying, generation=2, selector=EDGE), NODES[:1], EVERYWHERE).status
    reconciling = condition(status, "Reconciling")
    assert reconciling["reason"] == "ResourceApiUnavailable" and "attempt 2 failed: 503" in status["message"]
    assert status["observedGeneration"] == 2 and status["readyNodes"] == "0/1"


def test_nodes_that_verified_different_ids_are_named_not_one_taken_as_the_truth():
    """Issue 18, item 8: two nodes' archives under one version hold different images: each
    node is usable, but the summary names the difference and lists only shared IDs."""
    other = [{"name": "azaion/x:1", "id": "sha256:2"}]
    both = [*IMAGES, {"name": "azaion/y:1", "id": "sha256:9"}]
    status = summarize(
        body(
            entry("a", images=both),
            entry("b", images=[*other, {"name": "azaion/y:1", "id": "sha256:9"}]),
            selector=EDGE,
        ),
        NODES,
        EVERYWHERE,
    ).status
    ready = condition(status, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "ImagesDiffer"
    assert "azaion/x:1: sha256:1… on a, sha256:2… on b" in ready["message"]
    assert status["images"] == [{"name": "azaion/y:1", "id": "sha256:9", "present": True}]


def test_digest_entries_that_differ_are_named_too():
    a = entry("a", images=None, imagesDigest=digest_of(IMAGES))
    b = entry("b", images=None, imagesDigest=digest_of([{"name": "azaion/x:1", "id": "sha256:2"}]))
    ready = condition(summarize(body(a, b, selector=EDGE), NODES, EVERYWHERE).status, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "ImagesDiffer"
    assert "different image lists" in ready["message"] and "a" in ready["message"]
