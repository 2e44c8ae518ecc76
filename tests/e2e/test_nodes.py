"""Node agents (issue 11) on real parts: three simulated nodes — two on their own dockerd, one
on containerd (its runtime taken from the Node, as kubelet reports it) — each served by its
own agent process, one controller, one ImageUnlock ``fleet`` selecting them all at once. The
archive path is the same on every node, as on a real fleet; the containerd node's agent runs
in a mount namespace of its own where that directory is its own disk.

One fleet for the module (started once: the daemons, agents and the first unlock are most of
the time), one behaviour per test, in this order: each test leaves the fleet as its name
says (a node's images removed and restored, a node relabelled out, a node deleted), and the
later ones hold only to what they change themselves."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH

from ..support.cluster import Cluster, is_ready, is_stalled, spec_for
from ..support.containerd import Containerd
from ..support.dockerd import Dockerd, load_events, loaded, remove_images, running
from ..support.images import ArchiveSet
from ..support.operator_process import OperatorProcess, place
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from ..support.wait import wait_for
from .conftest import agent_starter, controller_starter, create_secret, new_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.containerd]

DOCKER_A, DOCKER_B, CONTAINERD = "edge-docker-a", "edge-docker-b", "edge-containerd"


@dataclass
class Fleet:
    cluster: Cluster
    namespace: str
    secret: str
    selector: dict[str, dict[str, str]]
    root: Path  # the archive directory of the docker nodes (the containerd node has its own)
    engines: dict[str, Dockerd]
    agents: dict[str, OperatorProcess]
    resource_api: FakeResourceApi

    def entries(self, name: str = "fleet") -> dict[str, dict]:
        return self.cluster.entries(self.namespace, name)

    def status(self, name: str = "fleet") -> dict:
        return self.cluster.status(self.namespace, name)


@pytest.fixture(scope="module")
def second_dockerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dockerd]:
    """A second node's own Docker Engine."""
    yield from running(tmp_path_factory.mktemp("dockerd-b"))


@pytest.fixture(scope="module")
def fleet(
    cluster: Cluster,
    crd: str,
    archives: ArchiveSet,
    dockerd: Dockerd,
    second_dockerd: Dockerd,
    containerd: Containerd,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    """Three Nodes labelled for this module only (other tests' ImageUnlocks select node-1),
    their agents, the controller, and ``fleet`` Ready on all three."""
    workdir = tmp_path_factory.mktemp("fleet")
    root, own_disk = workdir / "archives", workdir / "containerd-node-disk"
    root.mkdir()
    own_disk.mkdir()
    path = place(archives.openssl_archive, root)
    place(archives.openssl_archive, own_disk)  # the same archive, on the third node's own disk
    engines = {DOCKER_A: dockerd, DOCKER_B: second_dockerd}
    for engine in engines.values():
        remove_images(engine)
    containerd.reset()
    with new_namespace(cluster) as namespace:
        labels = {"imageunlock-test": namespace, "role": "edge"}
        cluster.ensure_node(DOCKER_A, "docker://24.0.9", labels)
        cluster.ensure_node(DOCKER_B, "docker://24.0.9", labels)
        cluster.ensure_node(CONTAINERD, "containerd://2.1.4", labels)
        try:
            with (
                FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as resource_api,
                controller_starter(cluster, workdir) as start_controller,
                agent_starter(cluster, resource_api, start_controller, workdir) as start_agent,
            ):
                agents = {n: start_agent(n, root, IMAGEUNLOCK_DOCKER_HOST=e.url) for n, e in engines.items()}
                agents[CONTAINERD] = start_agent(  # no IMAGEUNLOCK_RUNTIME: the Node says containerd
                    CONTAINERD,
                    root,
                    disk=own_disk,
                    IMAGEUNLOCK_CONTAINERD_ADDRESS=str(containerd.socket),
                    PATH=containerd.env()["PATH"],
                )
                secret = create_secret(cluster, namespace)
                selector = {"matchLabels": {"imageunlock-test": namespace}}
                spec = spec_for(path, archives.version, secret, nodeSelector=selector)
                cluster.create_unlock(namespace, "fleet", spec)
                cluster.kubectl(
                    "wait", "--for=condition=Ready", "iu/fleet", "-n", namespace, "--timeout=150s", timeout=180
                )
                yield Fleet(cluster, namespace, secret, selector, root, engines, agents, resource_api)
        finally:
            for name in (DOCKER_A, DOCKER_B, CONTAINERD):
                cluster.delete_node(name)


def test_three_agents_write_one_entry_each_and_the_summary_counts_them(fleet: Fleet, archives: ArchiveSet):
    """All three agents wrote at once: three entries, none lost; each node loaded with its own key."""
    entries = fleet.entries()
    assert {n: e["runtime"] for n, e in entries.items()} == {
        DOCKER_A: "docker",
        DOCKER_B: "docker",
        CONTAINERD: "containerd",
    }
    for entry in entries.values():
        assert entry["phase"] == "Ready" and entry["lastUnlockTime"]
        assert {i["name"]: i["id"] for i in entry["images"]} == archives.ids
    status = fleet.status()
    assert (status["readyNodes"], status["nodesReady"], status["nodesDesired"]) == ("3/3", 3, 3)
    assert all(loaded(engine) == archives.ids for engine in fleet.engines.values())
    assert fleet.resource_api.calls[KEY_FRAGMENT_PATH] == 3  # one key per node
    table = fleet.cluster.kubectl("get", "iu", "fleet", "-n", fleet.namespace).stdout
    assert table.split("\n")[0].split()[4] == "NODES" and "3/3" in table
    events = {e.message for e in fleet.cluster.events(fleet.namespace, "fleet") if e.reason == "Unlocked"}
    assert {m.split(":")[0] for m in events} == {f"node {n}" for n in entries}


def test_images_removed_on_one_node_are_unlocked_again_on_that_node_only(fleet: Fleet, archives: ArchiveSet):
    since, keys = time.time(), fleet.resource_api.calls[KEY_FRAGMENT_PATH]
    unlocked_before = {n: e["lastUnlockTime"] for n, e in fleet.entries().items()}
    remove_images(fleet.engines[DOCKER_B])
    wait_for(
        lambda: (
            fleet.entries()[DOCKER_B].get("lastUnlockTime") != unlocked_before[DOCKER_B]
            and is_ready(fleet.cluster, fleet.namespace, "fleet")
        ),
        90,
        "node b to unlock again",
    )
    assert loaded(fleet.engines[DOCKER_B]) == archives.ids
    assert load_events(fleet.engines[DOCKER_A], since) == 0
    assert fleet.resource_api.calls[KEY_FRAGMENT_PATH] == keys + 1
    after = fleet.entries()
    assert after[DOCKER_A]["lastUnlockTime"] == unlocked_before[DOCKER_A]
    assert after[CONTAINERD]["lastUnlockTime"] == unlocked_before[CONTAINERD]


def test_a_node_relabelled_out_of_the_selection_leaves_the_list_and_the_count(fleet: Fleet):
    fleet.cluster.label_node(DOCKER_A, {"imageunlock-test": None})
    wait_for(lambda: DOCKER_A not in fleet.entries(), 120, "node a's entry gone")
    remaining = len(fleet.entries())
    wait_for(lambda: fleet.status().get("readyNodes") == f"{remaining}/{remaining}", 30, "NODES without node a")
    assert is_ready(fleet.cluster, fleet.namespace, "fleet")


@pytest.fixture(scope="module")
def partial(fleet: Fleet, archives_v2: ArchiveSet) -> str:
    """A second ImageUnlock whose archive is missing on the containerd node (another version:
    the same refs from another archive would be contested by ``fleet``), Stalled."""
    only_here = place(archives_v2.openssl_archive, fleet.root, "not-on-every-node.enc")  # not on its own disk
    spec = spec_for(only_here, archives_v2.version, fleet.secret, nodeSelector=fleet.selector)
    fleet.cluster.create_unlock(fleet.namespace, "partial", spec)
    wait_for(lambda: is_stalled(fleet.cluster, fleet.namespace, "partial"), 120, "partial Stalled")
    return "partial"


def test_a_node_missing_the_archive_is_stalled_and_named_while_the_others_are_ready(fleet: Fleet, partial: str):
    stalled = fleet.cluster.condition(fleet.namespace, partial, "Stalled")
    assert stalled["reason"] == "ArchiveNotFound"
    assert stalled["message"].startswith(f"node {CONTAINERD}:") and DOCKER_B not in stalled["message"]
    wait_for(lambda: fleet.entries(partial).get(DOCKER_B, {}).get("phase") == "Ready", 60, "b Ready")
    assert fleet.entries(partial)[CONTAINERD]["phase"] == "Failed"
    assert not is_ready(fleet.cluster, fleet.namespace, partial)


def test_a_deleted_node_leaves_the_list_of_every_imageunlock_it_was_in(fleet: Fleet, partial: str):
    """Its agent is gone with it: the controller removes its entries, each ImageUnlock in its
    own pass."""
    others = set(fleet.entries()) - {DOCKER_B}
    fleet.agents[DOCKER_B].stop(signal.SIGKILL)
    fleet.cluster.delete_node(DOCKER_B)
    wait_for(lambda: set(fleet.entries()) == others, 120, "node b's entry gone")
    wait_for(lambda: fleet.status().get("readyNodes") == f"{len(others)}/{len(others)}", 30, "NODES without node b")
    wait_for(lambda: DOCKER_B not in fleet.entries(partial), 30, "node b's other entry gone")
