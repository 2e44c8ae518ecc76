"""Node agents (issue 11) on real parts: three simulated nodes — two on their own dockerd, one
on containerd (its runtime taken from the Node, as kubelet reports it) — each served by its
own agent process, one controller, one ImageUnlock selecting them all at once. The archive
path is the same on every node, as on a real fleet; the containerd node's agent runs in a
mount namespace of its own where that directory is its own disk."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH

from ..support.cluster import Cluster, is_ready, is_stalled, spec_for
from ..support.dockerd import Dockerd, load_events, loaded, remove_images, running
from ..support.operator_process import place
from ..support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.containerd]

DOCKER_A, DOCKER_B, CONTAINERD = "edge-docker-a", "edge-docker-b", "edge-containerd"


@pytest.fixture(scope="module")
def second_dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A second node's own Docker Engine."""
    yield from running(tmp_path_factory.mktemp("dockerd-b"))


@pytest.fixture
def three_nodes(cluster: Cluster, namespace: str) -> Iterator[dict[str, str]]:
    """Node objects labelled for this test only (other tests' ImageUnlocks select node-1)."""
    labels = {"imageunlock-test": namespace, "role": "edge"}
    cluster.ensure_node(DOCKER_A, "docker://24.0.9", labels)
    cluster.ensure_node(DOCKER_B, "docker://24.0.9", labels)
    cluster.ensure_node(CONTAINERD, "containerd://2.1.4", labels)
    try:
        yield labels
    finally:
        for name in (DOCKER_A, DOCKER_B, CONTAINERD):
            cluster.delete_node(name)


def test_three_agents_one_imageunlock_the_whole_cluster(
    cluster,
    namespace,
    secret,
    three_nodes,
    start_agent,
    archives,
    archives_v2,
    clean_docker,
    second_dockerd,
    clean_containerd,
    resource_api,
    tmp_path: Path,
):
    remove_images(second_dockerd)
    root, own_disk = tmp_path / "archives", tmp_path / "containerd-node-disk"
    root.mkdir()
    own_disk.mkdir()
    path = place(archives.openssl_archive, root)
    place(archives.openssl_archive, own_disk)  # the same archive, on the third node's own disk
    engines = {DOCKER_A: clean_docker, DOCKER_B: second_dockerd}
    agents = {name: start_agent(name, root, IMAGEUNLOCK_DOCKER_HOST=engine.url) for name, engine in engines.items()}
    agents[CONTAINERD] = start_agent(  # no IMAGEUNLOCK_RUNTIME: the Node says containerd
        CONTAINERD,
        root,
        disk=own_disk,
        IMAGEUNLOCK_CONTAINERD_ADDRESS=str(clean_containerd.socket),
        PATH=clean_containerd.env()["PATH"],
    )
    selector = {"matchLabels": {"imageunlock-test": namespace}}
    cluster.create_unlock(namespace, "fleet", spec_for(path, archives.version, secret, nodeSelector=selector))
    cluster.kubectl("wait", "--for=condition=Ready", "iu/fleet", "-n", namespace, "--timeout=150s", timeout=180)

    # all three agents wrote at once: three entries, none lost; the summary counts them
    status = cluster.status(namespace, "fleet")
    entries = cluster.entries(namespace, "fleet")
    assert set(entries) == {DOCKER_A, DOCKER_B, CONTAINERD}
    assert {n: e["runtime"] for n, e in entries.items()} == {
        DOCKER_A: "docker",
        DOCKER_B: "docker",
        CONTAINERD: "containerd",
    }
    for entry in entries.values():
        assert entry["phase"] == "Ready" and entry["lastUnlockTime"]
        assert {i["name"]: i["id"] for i in entry["images"]} == archives.ids
    assert (status["readyNodes"], status["nodesReady"], status["nodesDesired"]) == ("3/3", 3, 3)
    assert loaded(clean_docker) == archives.ids and loaded(second_dockerd) == archives.ids
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 3  # one key per node
    table = cluster.kubectl("get", "iu", "fleet", "-n", namespace).stdout
    assert table.split("\n")[0].split()[4] == "NODES" and "3/3" in table
    events = {e.message for e in cluster.events(namespace, "fleet") if e.reason == "Unlocked"}
    assert {m.split(":")[0] for m in events} == {f"node {n}" for n in entries}

    # images removed on one node: only that node unlocks again
    since = time.time()
    unlocked_before = {n: e["lastUnlockTime"] for n, e in entries.items()}
    remove_images(second_dockerd)
    wait_for(
        lambda: (
            cluster.entries(namespace, "fleet")[DOCKER_B].get("lastUnlockTime") != unlocked_before[DOCKER_B]
            and is_ready(cluster, namespace, "fleet")
        ),
        90,
        "node b to unlock again",
    )
    assert loaded(second_dockerd) == archives.ids
    assert load_events(clean_docker, since) == 0 and resource_api.calls[KEY_FRAGMENT_PATH] == 4
    after = cluster.entries(namespace, "fleet")
    assert after[DOCKER_A]["lastUnlockTime"] == unlocked_before[DOCKER_A]
    assert after[CONTAINERD]["lastUnlockTime"] == unlocked_before[CONTAINERD]

    # a node relabelled out of the selection leaves the list and the count
    cluster.label_node(DOCKER_A, {"imageunlock-test": None})
    wait_for(lambda: set(cluster.entries(namespace, "fleet")) == {DOCKER_B, CONTAINERD}, 120, "node a's entry gone")
    wait_for(lambda: cluster.status(namespace, "fleet").get("readyNodes") == "2/2", 30, "NODES 2/2")
    assert is_ready(cluster, namespace, "fleet")

    # one node's archive missing: that node Stalled and named, the other Ready
    # (another version: the same refs from another archive would be contested by "fleet")
    only_here = place(archives_v2.openssl_archive, root, "not-on-every-node.enc")  # not on the third node's disk
    partial = spec_for(only_here, archives_v2.version, secret, nodeSelector=selector)
    cluster.create_unlock(namespace, "partial", partial)
    wait_for(lambda: is_stalled(cluster, namespace, "partial"), 120, "partial Stalled")
    stalled = cluster.condition(namespace, "partial", "Stalled")
    assert stalled["reason"] == "ArchiveNotFound"
    assert stalled["message"].startswith(f"node {CONTAINERD}:") and DOCKER_B not in stalled["message"]
    wait_for(lambda: cluster.entries(namespace, "partial").get(DOCKER_B, {}).get("phase") == "Ready", 60, "b Ready")
    assert cluster.entries(namespace, "partial")[CONTAINERD]["phase"] == "Failed"
    assert not is_ready(cluster, namespace, "partial")

    # a deleted Node (its agent gone with it) leaves the list: the controller removes the entry
    agents[DOCKER_B].stop(signal.SIGKILL)
    cluster.delete_node(DOCKER_B)
    wait_for(lambda: set(cluster.entries(namespace, "fleet")) == {CONTAINERD}, 120, "node b's entry gone")
    wait_for(lambda: cluster.status(namespace, "fleet").get("readyNodes") == "1/1", 30, "NODES 1/1")
    # each ImageUnlock is summed up on its own: the other one's entry goes in its own pass
    wait_for(lambda: DOCKER_B not in cluster.entries(namespace, "partial"), 30, "node b's other entry gone")
