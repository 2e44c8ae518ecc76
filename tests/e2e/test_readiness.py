"""Issue 20 on the real plane: the readiness label (item 4) and DiskPressure (item 2).

The controller keeps ``<spec.readinessLabel>=<spec.version>`` on the plane's Node while its
entry is Ready for the current generation, and removes it when the node is not ready, no
longer selected, or the ImageUnlock is deleted — also when that happened while no controller
ran. A node whose DiskPressure condition is True starts no import (NodeDiskPressure,
Reconciling) and goes ahead once the condition clears. Each test uses a key of its own (the
namespace's name): node-1 is shared with every other test of the session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from imageunlock.controller.readiness import MANAGED

from ..support.cluster import NODE, Cluster, is_ready, is_stalled, spec_for
from ..support.dockerd import Dockerd, loaded
from ..support.images import ArchiveSet
from ..support.operator_process import OperatorProcess, place
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e


def label(cluster: Cluster, key: str, node: str = NODE) -> str | None:
    return cluster.node_metadata(node)[0].get(key)


def managed(cluster: Cluster, node: str = NODE) -> str | None:
    return cluster.node_metadata(node)[1].get(MANAGED)


def test_the_readiness_label_follows_ready_not_ready_deselection_and_deletion(
    cluster: Cluster, namespace: str, secret: str, start_operator, archives: ArchiveSet, archive_root: Path
):
    key = f"unlock.loader.azaion.com/{namespace}"
    start_operator()
    path = place(archives.own_archive, archive_root)
    cluster.create_unlock(namespace, "labelled", spec_for(path, archives.version, secret, readinessLabel=key))
    wait_for(lambda: label(cluster, key) == archives.version, 60, "the label at the version")
    assert is_ready(cluster, namespace, "labelled") and key in (managed(cluster) or "").split(",")

    # not ready: the archive is gone on the node (a new generation, Stalled there)
    cluster.patch_spec(namespace, "labelled", {"archivePath": str(archive_root / "missing.enc")})
    wait_for(lambda: is_stalled(cluster, namespace, "labelled"), 60, "Stalled")
    wait_for(lambda: label(cluster, key) is None, 30, "the label removed from the node that is not ready")

    cluster.patch_spec(namespace, "labelled", {"archivePath": path})
    wait_for(lambda: label(cluster, key) == archives.version, 60, "the label back once Ready again")

    # deselected: the ImageUnlock no longer selects node-1
    cluster.patch_spec(namespace, "labelled", {"nodeSelector": {"matchLabels": {"imageunlock-test": "nowhere"}}})
    wait_for(lambda: label(cluster, key) is None, 60, "the label removed from the deselected node")
    cluster.patch_spec(namespace, "labelled", {"nodeSelector": None})
    wait_for(lambda: label(cluster, key) == archives.version, 60, "the label back once selected and Ready")

    cluster.delete(namespace, "labelled")
    wait_for(lambda: label(cluster, key) is None, 30, "the label removed with the ImageUnlock")
    assert key not in (managed(cluster) or "").split(",")


def test_a_label_whose_imageunlock_was_deleted_while_no_controller_ran_is_removed_at_start_up(
    cluster: Cluster,
    namespace: str,
    secret: str,
    start_operator,
    start_controller: Callable[..., OperatorProcess],
    archives: ArchiveSet,
    archive_root: Path,
):
    """No finalizer (deletion stays instant): the Node's annotation says which keys the
    operator set, and the next controller removes the ones no ImageUnlock wants; a label
    still due stays."""
    gone, kept = f"gone.example.com/{namespace}", f"kept.example.com/{namespace}"
    start_operator()
    path = place(archives.own_archive, archive_root)
    cluster.create_unlock(namespace, "gone", spec_for(path, archives.version, secret, readinessLabel=gone))
    cluster.create_unlock(namespace, "kept", spec_for(path, archives.version, secret, readinessLabel=kept))
    wait_for(lambda: label(cluster, gone) == label(cluster, kept) == archives.version, 60, "both labels")
    start_controller().stop()
    cluster.delete(namespace, "gone")
    assert label(cluster, gone) == archives.version  # no controller: nothing removed it yet
    start_controller()
    wait_for(lambda: label(cluster, gone) is None, 60, "the stale label removed at start-up")
    assert label(cluster, kept) == archives.version
    assert managed(cluster) is not None and gone not in managed(cluster).split(",")


def test_a_node_under_disk_pressure_holds_the_import_and_goes_ahead_when_it_clears(
    cluster: Cluster,
    namespace: str,
    secret: str,
    start_operator,
    archives: ArchiveSet,
    archive_root: Path,
    clean_docker: Dockerd,
):
    cluster.ensure_node(NODE)
    cluster.set_node_condition(NODE, "DiskPressure", "True")
    try:
        start_operator()
        path = place(archives.own_archive, archive_root)
        cluster.create_unlock(namespace, "held", spec_for(path, archives.version, secret))

        def held() -> dict | None:
            entry = cluster.entries(namespace, "held").get(NODE) or {}
            return entry if entry.get("reason") == "NodeDiskPressure" else None

        entry = wait_for(held, 60, "the node's entry held by NodeDiskPressure")
        assert entry["phase"] != "Failed" and "reports DiskPressure" in entry["message"]
        reconciling = wait_for(
            lambda: (
                (c := cluster.condition(namespace, "held", "Reconciling")).get("reason") == "NodeDiskPressure" and c
            ),
            30,
            "the summary Reconciling for NodeDiskPressure",
        )
        assert reconciling["status"] == "True" and not is_stalled(cluster, namespace, "held")
        assert loaded(clean_docker) == {}  # nothing imported meanwhile
        cluster.set_node_condition(NODE, "DiskPressure", "False")
        wait_for(lambda: is_ready(cluster, namespace, "held"), 60, "Ready once DiskPressure cleared")
        assert loaded(clean_docker) == archives.ids
    finally:
        cluster.set_node_condition(NODE, "DiskPressure", "False")
