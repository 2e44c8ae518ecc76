"""An ImageUnlock's life with the real operator process, a real API server and dockerd:
created and Ready, an impostor replaced at the first unlock, a version change, a removed
image restored by re-verification, the same spec applied again, and deletion while the
operator is down."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH

from ..support.cluster import NODE, Cluster, is_ready, spec_for, unlock_object
from ..support.dockerd import Dockerd, load_events, loaded, remove_images
from ..support.images import ArchiveSet
from ..support.operator_process import OperatorProcess, place
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from ..support.wait import wait_for
from .conftest import agent_starter, controller_starter, create_secret, new_namespace

pytestmark = pytest.mark.e2e


@dataclass
class Unlocked:
    cluster: Cluster
    namespace: str
    operator: OperatorProcess
    engine: Dockerd
    resource_api: FakeResourceApi


class TestANewImageUnlock:
    """A Secret and an ImageUnlock applied on node-1: what a user then sees, one test each,
    of one unlock (started once for the class: class scope ends before the next test starts
    its own agent for node-1)."""

    @pytest.fixture(scope="class")
    def unlocked(
        self, cluster: Cluster, crd: str, archives: ArchiveSet, dockerd: Dockerd, tmp_path_factory
    ) -> Iterator[Unlocked]:
        workdir = tmp_path_factory.mktemp("unlocked")
        root = workdir / "archives"
        root.mkdir()
        remove_images(dockerd)
        cluster.ensure_node(NODE)
        with (
            new_namespace(cluster) as namespace,
            FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as resource_api,
            controller_starter(cluster, workdir) as start_controller,
            agent_starter(cluster, resource_api, start_controller, workdir) as start_agent,
        ):
            operator = start_agent(NODE, root, IMAGEUNLOCK_DOCKER_HOST=dockerd.url)
            spec = spec_for(place(archives.openssl_archive, root), archives.version, create_secret(cluster, namespace))
            cluster.create_unlock(namespace, "images", spec)
            cluster.kubectl(
                "wait", "--for=condition=Ready", "imageunlock/images", "-n", namespace, "--timeout=120s", timeout=150
            )
            yield Unlocked(cluster, namespace, operator, dockerd, resource_api)

    def test_it_becomes_ready_with_every_image_loaded_and_verified_with_one_key_request(
        self, unlocked: Unlocked, archives: ArchiveSet
    ):
        status = unlocked.cluster.status(unlocked.namespace, "images")
        assert status["phase"] == "Ready" and status["observedGeneration"] == 1
        assert {i["name"]: i["id"] for i in status["images"]} == archives.ids
        assert status["progress"]["text"] == "100%" and status["lastUnlockTime"]
        assert unlocked.cluster.condition(unlocked.namespace, "images", "Reconciling")["status"] == "False"
        assert unlocked.cluster.condition(unlocked.namespace, "images", "Stalled")["status"] == "False"
        assert loaded(unlocked.engine) == archives.ids
        assert unlocked.resource_api.calls[KEY_FRAGMENT_PATH] == 1

    def test_its_node_entry_names_the_node_its_runtime_and_the_verified_images(
        self, unlocked: Unlocked, archives: ArchiveSet
    ):
        [entry] = unlocked.cluster.status(unlocked.namespace, "images")["nodes"]
        assert entry["name"] == NODE and entry["runtime"] == "docker" and entry["phase"] == "Ready"
        assert {i["name"]: i["id"] for i in entry["images"]} == archives.ids and entry["lastUnlockTime"]

    def test_unlocking_and_unlocked_events_are_recorded(self, unlocked: Unlocked):
        assert {"Unlocking", "Unlocked"} <= {e.reason for e in unlocked.cluster.events(unlocked.namespace, "images")}

    def test_kubectl_get_prints_phase_version_ready_nodes_and_progress(self, unlocked: Unlocked, archives: ArchiveSet):
        table = unlocked.cluster.kubectl("get", "iu", "-n", unlocked.namespace).stdout
        assert table.split("\n")[0].split() == ["NAME", "PHASE", "VERSION", "READY", "NODES", "PROGRESS", "AGE"]
        assert "Ready" in table and "1/1" in table and "100%" in table and archives.version in table

    def test_the_liveness_probe_reports_the_runtime_reachable(self, unlocked: Unlocked):
        assert unlocked.operator.probe().get("runtime") == "reachable"

    def test_it_has_no_finalizer_so_deletion_never_waits_for_the_operator(self, unlocked: Unlocked):
        assert not unlocked.cluster.get(unlocked.namespace, "images")["metadata"].get("finalizers")


def test_images_present_before_the_first_unlock_are_not_vouched_for(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    """Issue 8, item 4: an impostor at NAME:VERSION before the first unlock was reported Ready
    (AlreadyPresent) and its ID recorded as verified. Now the first unlock compares and replaces."""
    clean_docker.docker("load", "-i", str(archives.plaintext))
    clean_docker.docker("tag", archives.refs[1], archives.refs[0])  # impostor under the first name
    start_operator()
    cluster.create_unlock(
        namespace, "present", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "present"), 60, "Ready")
    assert cluster.condition(namespace, "present", "Ready")["reason"] == "Unlocked"
    assert loaded(clean_docker) == archives.ids  # the impostor's tag now holds the archive's image
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1


def test_version_change_is_reconciled(
    cluster, namespace, secret, start_operator, archives, archives_v2, archive_root, clean_docker
):
    old = place(archives.own_archive, archive_root, "v1.enc")
    new = place(archives_v2.own_archive, archive_root, "v2.enc")
    start_operator()
    cluster.create_unlock(namespace, "versions", spec_for(old, archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "versions"), 60, "Ready at v1")
    cluster.patch_spec(namespace, "versions", {"version": archives_v2.version, "archivePath": new})
    wait_for(
        lambda: (
            cluster.status(namespace, "versions").get("observedGeneration") == 2
            and is_ready(cluster, namespace, "versions")
        ),
        60,
        "Ready at generation 2",
    )
    status = cluster.status(namespace, "versions")
    assert {i["name"]: i["id"] for i in status["images"]} == archives_v2.ids
    assert cluster.condition(namespace, "versions", "Ready")["observedGeneration"] == 2


def test_removed_image_is_restored_by_reverification(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    path = place(archives.openssl_archive, archive_root)
    start_operator()
    cluster.create_unlock(namespace, "keep", spec_for(path, archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "keep"), 60, "Ready")
    clean_docker.docker("rmi", archives.refs[2])
    wait_for(lambda: loaded(clean_docker) == archives.ids, 60, "the removed image to come back")
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 2
    wait_for(lambda: is_ready(cluster, namespace, "keep"), 30, "Ready again")


def test_reapplying_the_same_spec_loads_nothing_again(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker
):
    since = time.time()
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    spec = spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    manifest = json.dumps(unlock_object(namespace, "same", spec))
    cluster.kubectl("apply", "-f", "-", input=manifest)
    wait_for(lambda: is_ready(cluster, namespace, "same"), 60, "Ready")
    generation = cluster.get(namespace, "same")["metadata"]["generation"]
    cluster.kubectl("apply", "-f", "-", input=manifest)  # unchanged: kubectl sends no change
    cluster.kubectl("label", "imageunlock/same", "-n", namespace, "touched=yes")
    # A change that is no spec change, then a re-check request: once the node has answered the
    # request it has seen the label change too. A wrong reconcile would have loaded before that.
    cluster.request_check(namespace, "same", "after-label")
    wait_for(
        lambda: cluster.status(namespace, "same").get("lastHandledRequestedAt") == "after-label",
        30,
        "the agent to have handled the label change",
    )
    assert cluster.get(namespace, "same")["metadata"]["generation"] == generation
    assert load_events(clean_docker, since) == len(archives.refs)


def test_delete_while_operator_is_down_does_not_hang(
    cluster, namespace, secret, start_operator, archives, archive_root
):
    path = place(archives.openssl_archive, archive_root)
    operator = start_operator()
    cluster.create_unlock(namespace, "gone", spec_for(path, archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "gone"), 60, "Ready")
    operator.stop()
    cluster.delete(namespace, "gone")
    wait_for(
        lambda: "gone" not in [i["metadata"]["name"] for i in cluster.list(namespace)],
        15,
        "deletion without the operator",
    )
