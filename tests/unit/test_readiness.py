"""The readiness label (issue 20, item 4): ``<spec.readinessLabel>=<spec.version>`` on every
selected node that is Ready for the current generation, on no other node; the patches that
get every Node there, and the keys the operator set remembered on the Node (MANAGED)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from imageunlock.controller.handlers import MANAGER, LabelWriter
from imageunlock.controller.readiness import (
    MANAGED,
    desired_labels,
    foreign_claims,
    key_owners,
    label_patches,
    managed_keys,
)
from imageunlock.errors import KubernetesUnavailableError
from imageunlock.kube.labels import LABEL_KEY, readiness_key_problem, readiness_problems
from imageunlock.kube.models import ImageUnlockSpec
from imageunlock.kube.nodes import NodeInfo, Placement

KEY = "unlock.loader.azaion.com/azaion-images"
EVERYWHERE = Placement()
EDGE = {"matchLabels": {"role": "edge"}}


def node(name: str, role: str = "edge", **labels: str) -> NodeInfo:
    return NodeInfo(name, {"role": role, **labels})


def entry(name: str, phase: str = "Ready", generation: int = 1) -> dict[str, Any]:
    return {"name": name, "phase": phase, "observedGeneration": generation, "reason": "Unlocked"}


def unlock(
    *entries: dict[str, Any],
    name: str = "iu",
    version: str = "1.0.0",
    key: str | None = KEY,
    generation: int = 1,
    selector: Any = EDGE,
    namespace: str = "ns",
    created: str = "2026-01-01T00:00:00Z",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"version": version, "nodeSelector": selector}
    if key is not None:
        spec["readinessLabel"] = key
    meta = {"name": name, "namespace": namespace, "generation": generation, "creationTimestamp": created}
    return {"metadata": meta, "spec": spec, "status": {"nodes": list(entries)}}


NODES = [node("a"), node("b"), node("c", role="cloud")]


def labels_of(*objects: dict[str, Any], nodes: list[NodeInfo] = NODES) -> dict[str, dict[str, str]]:
    return desired_labels(objects, nodes, EVERYWHERE)[1]


def test_only_selected_nodes_ready_for_this_generation_carry_the_version():
    iu = unlock(entry("a"), entry("b", phase="Loading"), entry("c"))  # c is not selected
    assert labels_of(iu) == {"a": {KEY: "1.0.0"}}


def test_a_ready_entry_of_an_older_generation_carries_nothing():
    """A new version (generation 2) is not ready where the node still holds generation 1."""
    iu = unlock(entry("a", generation=1), entry("b", generation=2), version="1.5.0", generation=2)
    assert labels_of(iu) == {"b": {KEY: "1.5.0"}}


def test_stalled_deselected_or_no_label_key_carries_nothing():
    assert labels_of(unlock(entry("a", phase="Failed"))) == {}
    assert labels_of(unlock(entry("a"), selector={"matchLabels": {"role": "none"}})) == {}
    assert labels_of(unlock(entry("a"), key=None)) == {}
    assert labels_of(unlock(entry("a"), selector={"matchLabels": {"role": "not valid!"}})) == {}  # invalid selector


def test_a_version_that_is_no_label_value_sets_nothing():
    """The CRD refuses it; on an older CRD the label stays off (and is removed), never mangled."""
    assert labels_of(unlock(entry("a"), version="_1.0")) == {}
    assert labels_of(unlock(entry("a"), version="x" * 64)) == {}
    assert labels_of(unlock(entry("a"), version="1.0.0-rc_1")) == {"a": {KEY: "1.0.0-rc_1"}}


def test_two_imageunlocks_sharing_a_key_set_it_only_where_both_agree():
    one = unlock(entry("a"), entry("b"), name="one")
    other = unlock(entry("a"), entry("b", phase="Loading"), name="other")
    assert labels_of(one, other) == {"a": {KEY: "1.0.0"}}
    newer = unlock(entry("a"), entry("b"), name="newer", version="2.0.0")
    assert labels_of(one, newer) == {}  # two versions behind one key: no one answer


def test_patches_set_what_is_due_and_remove_the_rest_with_the_managed_keys():
    nodes = [node("a"), node("b", **{KEY: "0.9.0"}), node("c", role="cloud", **{KEY: "1.0.0"})]
    managed = {"b": frozenset({KEY}), "c": frozenset({KEY})}
    patches = label_patches([unlock(entry("a"), entry("b", phase="Loading"))], nodes, EVERYWHERE, managed)
    assert patches == {
        "a": {"metadata": {"labels": {KEY: "1.0.0"}, "annotations": {MANAGED: KEY}}},
        "b": {"metadata": {"labels": {KEY: None}, "annotations": {MANAGED: None}}},
        "c": {"metadata": {"labels": {KEY: None}, "annotations": {MANAGED: None}}},  # deselected
    }


def test_a_label_the_operator_did_not_set_is_neither_overwritten_nor_removed():
    """Whoever may create an ImageUnlock names the key: it must not strip or rewrite the labels
    other workloads select nodes by (a node with such a label just gets no readiness label)."""
    nodes = [node("a", **{KEY: "theirs"}), node("b", role="cloud", **{KEY: "theirs"}), node("c")]
    patches = label_patches([unlock(entry("a"), entry("c"))], nodes, EVERYWHERE, {})
    assert patches == {"c": {"metadata": {"labels": {KEY: "1.0.0"}, "annotations": {MANAGED: KEY}}}}


def test_nothing_to_patch_when_every_node_is_as_due():
    nodes = [node("a", **{KEY: "1.0.0"}), node("b")]
    assert label_patches([unlock(entry("a"))], nodes, EVERYWHERE, {"a": frozenset({KEY})}) == {}


def test_a_deleted_imageunlock_leaves_its_key_only_in_the_annotation_which_removes_it():
    """No finalizer: at start-up (or on the DELETED event) no object names the key any more;
    the Node's annotation says the operator set it, so it goes."""
    nodes = [node("a", **{KEY: "1.0.0", "mine": "x"}), node("b", **{"other/key": "1"})]
    patches = label_patches([], nodes, EVERYWHERE, {"a": frozenset({KEY})})
    assert patches == {"a": {"metadata": {"labels": {KEY: None}, "annotations": {MANAGED: None}}}}


def test_a_changed_key_moves_the_label():
    nodes = [node("a", **{"old/key": "1.0.0"})]
    patches = label_patches([unlock(entry("a"), key="new/key")], nodes, EVERYWHERE, {"a": frozenset({"old/key"})})
    assert patches == {
        "a": {"metadata": {"labels": {"new/key": "1.0.0", "old/key": None}, "annotations": {MANAGED: "new/key"}}}
    }


# A key belongs to one namespace: that of its oldest ImageUnlock.
TEAM_A = "team-a.example.com/images-ready"


def test_another_namespace_naming_a_key_cannot_strip_its_label():
    """Team A's label, set by the controller, stays when team B creates (later) an ImageUnlock
    in its own namespace naming A's key that is never Ready: B's object is ignored for it."""
    nodes = [node("a", **{TEAM_A: "1.0.0"})]
    managed = {"a": frozenset({TEAM_A})}
    team_a = unlock(entry("a"), key=TEAM_A, namespace="team-a", name="app")
    squatter = unlock(entry("a", phase="Failed"), key=TEAM_A, namespace="team-b", created="2026-02-01T00:00:00Z")
    assert label_patches([team_a], nodes, EVERYWHERE, managed) == {}
    assert label_patches([team_a, squatter], nodes, EVERYWHERE, managed) == {}
    assert label_patches([squatter, team_a], nodes, EVERYWHERE, managed) == {}  # whatever the order


def test_another_namespace_cannot_set_a_key_where_the_owners_images_are_not():
    """Team B, Ready on b only (its own archive), must not put A's key with A's version on b,
    where A's ImageUnlock does not run: A's pods would be sent to a node without A's images."""
    team_a = unlock(entry("a"), key=TEAM_A, namespace="team-a", selector={"matchLabels": {"host": "a"}})
    squatter = unlock(entry("b"), key=TEAM_A, namespace="team-b", created="2026-02-01T00:00:00Z")
    nodes = [node("a", host="a"), node("b", host="b")]
    assert labels_of(team_a, squatter, nodes=nodes) == {"a": {TEAM_A: "1.0.0"}}


def test_a_key_belongs_to_its_oldest_imageunlocks_namespace_ties_by_namespace_name():
    first = unlock(key=TEAM_A, namespace="team-z", created="2026-01-01T00:00:00Z")
    later = unlock(key=TEAM_A, namespace="team-a", created="2026-03-01T00:00:00Z")
    tied = unlock(key=TEAM_A, namespace="team-y", created="2026-01-01T00:00:00Z")
    other = unlock(key=KEY, namespace="team-a", created="2026-03-01T00:00:00Z")
    assert key_owners([later, first, other]) == {TEAM_A: "team-z", KEY: "team-a"}
    assert key_owners([first, tied]) == key_owners([tied, first]) == {TEAM_A: "team-y"}
    assert foreign_claims([later, first, tied]) == [
        ("team-a", "iu", TEAM_A, "team-y"),
        ("team-z", "iu", TEAM_A, "team-y"),
    ]
    assert key_owners([unlock(key="kubernetes.io/x", namespace="a")]) == {}  # no usable key: no claim


def test_within_the_owning_namespace_every_imageunlock_must_still_agree():
    one = unlock(entry("a"), entry("b"), key=TEAM_A, namespace="team-a", name="one")
    other = unlock(entry("a"), key=TEAM_A, namespace="team-a", name="other", created="2026-05-01T00:00:00Z")
    assert labels_of(one, other) == {"a": {TEAM_A: "1.0.0"}}


def test_the_writer_warns_once_about_an_imageunlock_naming_another_namespaces_key(caplog):
    kube = NodeKube()
    writer = LabelWriter(kube, EVERYWHERE)  # type: ignore[arg-type]
    team_a = unlock(entry("a"), key=TEAM_A, namespace="team-a")
    squatter = unlock(entry("a"), key=TEAM_A, namespace="team-b", name="x", created="2026-02-01T00:00:00Z")
    with caplog.at_level("WARNING", logger="imageunlock.controller.handlers"):
        for _ in range(3):
            writer.sync([team_a, squatter], [node("a")], {})
    warnings = [r for r in caplog.records if "belongs to namespace team-a" in r.getMessage()]
    assert len(warnings) == 1 and "team-b/x" in warnings[0].getMessage()
    writer.sync([team_a], [node("a")], {})  # gone: warned again if it comes back
    caplog.clear()
    writer.sync([team_a, squatter], [node("a")], {})
    assert len([r for r in caplog.records if "belongs to namespace team-a" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    "key", ["node-restriction.kubernetes.io/pool", "node-role.kubernetes.io/control-plane", "not a key", "k8s.io/x"]
)
def test_a_reserved_or_invalid_key_listed_in_the_annotation_is_never_removed(key):
    """The keys the controller removes come from the Node's own annotation, which the node's
    kubelet (root on the node) or another controller may write: a reserved key listed there
    must not get the controller to remove a label its writer may not touch itself."""
    nodes = [node("a", **{key: "x"})]
    assert label_patches([], nodes, EVERYWHERE, {"a": frozenset({key})}) == {}
    raw = {"metadata": {"annotations": {MANAGED: f"{key},{KEY}"}}}
    assert managed_keys(raw) == {KEY}


def test_managed_keys_read_from_the_annotation():
    assert managed_keys({"metadata": {"annotations": {MANAGED: "a/b,c"}}}) == {"a/b", "c"}
    assert managed_keys({"metadata": {}}) == frozenset()


NOT_SUBDOMAINS = ["team-b..example.com/ready", "team-b.-x.example.com/ready", "team-b-.example.com/x", ".a.com/x"]


@pytest.mark.parametrize(
    "key",
    [
        *("not a key", "UPPER.example.com/x", "a/b/c", "-x", "x" * 64, "kubernetes.io/hostname", "node.k8s.io/x"),
        *NOT_SUBDOMAINS,
        f"{'a' * 250}.com/x",  # a prefix of 254 characters
    ],
)
def test_the_model_refuses_a_key_that_is_no_label_key_or_is_reserved(key):
    with pytest.raises(ValidationError):
        ImageUnlockSpec.model_validate({"archivePath": "/a", "version": "1", "readinessLabel": key})
    assert labels_of(unlock(entry("a"), key=key)) == {}  # and the controller writes nothing for it


@pytest.mark.parametrize("key", NOT_SUBDOMAINS)
def test_a_prefix_that_is_no_dns_subdomain_is_refused(key):
    """The API server answers 422 to a Node patch with such a key (an empty DNS label, or one
    starting or ending with '-'): the operator refuses it as the CRD does."""
    assert readiness_key_problem(key) is not None


@pytest.mark.parametrize("key", ["a-b.c9.example.com/x", "x/y", f"{'a' * 249}.com/x", "example.com/A_b.c"])
def test_a_dns_subdomain_prefix_is_taken(key):
    assert readiness_key_problem(key) is None


def test_the_crd_pattern_of_the_key_is_the_operators():
    crd = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "crds" / "loader.azaion.com_imageunlocks.yaml").read_text()
    )
    field = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
        "readinessLabel"
    ]
    assert field["pattern"] == LABEL_KEY
    rule = next(r["rule"] for r in field["x-kubernetes-validations"] if "253" in r["rule"])
    assert re.search(r"\^\[\^/\]\{1,253\}/", rule)  # the prefix's length, which no RE2 pattern bounds


def test_the_model_takes_a_qualified_key():
    spec = ImageUnlockSpec.model_validate({"archivePath": "/a", "version": "1", "readinessLabel": KEY})
    assert spec.readiness_label == KEY and spec.dump()["readinessLabel"] == KEY


def test_problems_name_a_version_and_a_key_the_selector_uses():
    assert readiness_problems(KEY, "1.0.0") == []
    problems = readiness_problems("role", "_bad", {"role"})
    assert len(problems) == 2 and "label value" in problems[0] and "nodeSelector" in problems[1]
    assert labels_of(unlock(entry("a"), key="role")) == {}


class NodeKube:
    def __init__(self, gone: set[str] = frozenset()) -> None:
        self.patches: list[tuple[str, dict[str, Any], str | None]] = []
        self.gone = gone

    def patch_node_metadata(self, name: str, patch: dict[str, Any], manager: str | None = None) -> bool:
        self.patches.append((name, patch, manager))
        return name not in self.gone


def test_the_writer_patches_each_node_once_as_the_controller_and_stops_when_no_longer_leading():
    kube = NodeKube(gone={"b"})
    writer = LabelWriter(kube, EVERYWHERE)  # type: ignore[arg-type]
    assert writer.sync([unlock(entry("a"), entry("b"))], [node("a"), node("b")], {}) == 1  # b was deleted meanwhile
    assert [(n, m) for n, _, m in kube.patches] == [("a", MANAGER), ("b", MANAGER)]
    leading = iter([True, False])
    follower = LabelWriter(kube, EVERYWHERE, may_write=lambda: next(leading))  # type: ignore[arg-type]
    kube.patches.clear()
    assert follower.sync([unlock(entry("a"), entry("b"))], [node("a"), node("b")], {}) == 1
    assert [n for n, _, _ in kube.patches] == ["a"]


def test_the_first_pass_waits_for_the_objects_listed_at_start_up_then_retries_failures():
    """A controller restart must not remove a due label because the watch has not delivered
    its ImageUnlock yet: the first pass waits until every object listed at start-up was seen.
    A failed pass (API server away) is tried again."""
    import asyncio
    from types import SimpleNamespace

    from imageunlock.controller import handlers as controller
    from imageunlock.errors import KubernetesUnavailableError

    passes: list[list[Any]] = []
    failures = [KubernetesUnavailableError("HTTP 503")]

    class Labeller:
        def sync(self, objects, nodes, managed):
            passes.append(list(objects))
            if failures:
                raise failures.pop()
            return 0

        def retry_in(self):
            return None

    async def run() -> None:
        memo = SimpleNamespace(
            objects={}, nodes={}, managed={}, awaited={("ns", "iu")}, labels_due=asyncio.Event(), labeller=Labeller()
        )
        memo.labels_due.set()
        task = asyncio.create_task(controller._label_loop(memo))
        await asyncio.sleep(0.5)
        assert passes == []  # ns/iu not delivered yet: no pass that would remove its label
        memo.objects[("ns", "iu")] = unlock(entry("a"))
        memo.awaited.discard(("ns", "iu"))
        memo.labels_due.set()
        for _ in range(60):
            await asyncio.sleep(0.1)
            if len(passes) >= 2:
                break
        task.cancel()

    asyncio.run(run())
    assert len(passes) == 2 and all(p == [unlock(entry("a"))] for p in passes)  # 503, then again


class RefusingKube(NodeKube):
    """The API server refuses (422) every patch that sets or removes ``bad``."""

    def __init__(self, bad: str) -> None:
        super().__init__()
        self.bad = bad

    def patch_node_metadata(self, name: str, patch: dict[str, Any], manager: str | None = None) -> bool:
        self.patches.append((name, patch, manager))
        if self.bad in (patch["metadata"].get("labels") or {}):
            raise KubernetesUnavailableError(f"labelling Node {name} failed (HTTP 422)")
        return True


def test_a_node_whose_patch_is_refused_holds_up_no_other_and_waits_its_own_backoff():
    """One Node's patch failing (here: a key the API server rejects, on an older CRD) is logged;
    the other Nodes are patched all the same, and only the failed Node is tried again, after a
    backoff that grows with each failure in a row."""
    bad = "team-b.example.com/ready"
    nodes = [node("a"), node("b", role="cloud")]
    team_a = unlock(entry("a"), entry("b"), key=TEAM_A, namespace="team-a", selector=None)
    team_b = unlock(entry("a"), key=bad, namespace="team-b")
    now = [100.0]
    kube = RefusingKube(bad)
    writer = LabelWriter(kube, EVERYWHERE, clock=lambda: now[0])  # type: ignore[arg-type]
    assert writer.sync([team_a, team_b], nodes, {}) == 1
    assert [n for n, _, _ in kube.patches] == ["a", "b"]  # b labelled although a was refused
    assert writer.retry_in() == 2.0
    kube.patches.clear()
    managed = {"b": frozenset({TEAM_A})}
    nodes[1] = node("b", role="cloud", **{TEAM_A: "1.0.0"})
    assert writer.sync([team_a, team_b], nodes, managed) == 0 and kube.patches == []  # a still waits
    now[0] += 2.0
    assert writer.sync([team_a, team_b], nodes, managed) == 0
    assert [n for n, _, _ in kube.patches] == ["a"] and writer.retry_in() == 4.0  # only a; longer
    now[0] += 4.0
    kube.patches.clear()
    assert writer.sync([team_a], nodes, managed) == 1  # b's key gone: a as due at last
    assert [n for n, _, _ in kube.patches] == ["a"] and writer.retry_in() is None


def test_the_loop_wakes_for_a_node_in_backoff():
    """A pass that left a Node in backoff wakes the loop when the backoff ends, with no other
    change to wait for."""
    import asyncio
    from types import SimpleNamespace

    from imageunlock.controller import handlers as controller

    passes: list[int] = []

    class Labeller:
        def sync(self, objects, nodes, managed):
            passes.append(1)
            return 0

        def retry_in(self):
            return 0.1 if len(passes) < 3 else None

    async def run() -> None:
        memo = SimpleNamespace(objects={}, nodes={}, managed={}, awaited=set(), labels_due=asyncio.Event())
        memo.labeller = Labeller()
        memo.labels_due.set()
        task = asyncio.create_task(controller._label_loop(memo))
        await asyncio.sleep(2.0)
        task.cancel()

    asyncio.run(run())
    assert len(passes) == 3
