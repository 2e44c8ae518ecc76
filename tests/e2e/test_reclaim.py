"""Issue 20, items 1-3: spec.reclaimPolicy with the real agent, the real API server, sid's
containerd (its CRI honours the pin, as kubelet reads it) and dockerd. An upgrade leaves the
old version unpinned and the new pinned, only once the new one is Ready; Delete removes the
old images but keeps one a container uses; a deleted ImageUnlock releases its images within
one verify interval (2 s here), also when the agent missed the delete."""

from __future__ import annotations

import pytest

from imageunlock.engine.refs import normalize_ref

from ..support.cluster import Cluster, is_ready, spec_for
from ..support.containerd import Containerd, Cri
from ..support.dockerd import loaded
from ..support.operator_process import place
from ..support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.containerd]


def ready_at(cluster: Cluster, namespace: str, name: str, generation: int) -> bool:
    return (
        is_ready(cluster, namespace, name) and cluster.status(namespace, name).get("observedGeneration") == generation
    )


def pinned(containerd: Containerd, refs: list[str]) -> dict[str, bool | None]:
    """What kubelet sees of each ref over the CRI: pinned, not pinned, or None when absent."""
    cri = Cri(containerd.socket, containerd.build.cri_proto)
    try:
        return {ref: None if (seen := cri.image_status(ref)) is None else seen.pinned for ref in refs}
    finally:
        cri.close()


def messages(cluster: Cluster, namespace: str, name: str, reason: str = "Reclaimed") -> list[str]:
    return [e.message for e in cluster.events(namespace, name) if e.reason == reason]


@pytest.fixture
def on_containerd(start_operator, clean_containerd: Containerd):
    def start():
        return start_operator(
            IMAGEUNLOCK_RUNTIME="containerd",
            IMAGEUNLOCK_CONTAINERD_ADDRESS=str(clean_containerd.socket),
            PATH=clean_containerd.env()["PATH"],
        )

    return start


def test_an_upgrade_unpins_the_old_version_after_the_new_is_ready_and_a_delete_releases_the_new(
    cluster, namespace, secret, on_containerd, clean_containerd, archives, archives_v2, archive_root
):
    v1 = place(archives.openssl_archive, archive_root, "v1.enc")
    v2 = place(archives_v2.openssl_archive, archive_root, "v2.enc")
    on_containerd()
    cluster.create_unlock(namespace, "images", spec_for(v1, archives.version, secret))
    wait_for(lambda: ready_at(cluster, namespace, "images", 1), 120, "version 1 Ready")
    assert set(pinned(clean_containerd, archives.refs).values()) == {True}

    cluster.patch_spec(namespace, "images", spec_for(v2, archives_v2.version, secret))
    wait_for(lambda: ready_at(cluster, namespace, "images", 2), 120, "version 2 Ready")
    wait_for(lambda: messages(cluster, namespace, "images"), 30, "the Reclaimed event")
    assert set(pinned(clean_containerd, archives.refs).values()) == {False}  # still there, collectable
    assert set(pinned(clean_containerd, archives_v2.refs).values()) == {True}
    assert messages(cluster, namespace, "images") == [
        f"node node-1: unpinned {len(archives.refs)} image(s) of {archives.version}"
    ]
    # the Event is posted before the entry is written: wait for the entry too
    wait_for(lambda: "reclaimed" in cluster.status(namespace, "images")["nodes"][0], 30, "status.nodes[].reclaimed")
    [entry] = cluster.status(namespace, "images")["nodes"]
    reclaimed = entry["reclaimed"]
    assert (reclaimed["policy"], reclaimed["version"]) == ("Unpin", archives.version)
    assert sorted(reclaimed["refs"]) == sorted(normalize_ref(ref) for ref in archives.refs)

    cluster.delete(namespace, "images")  # no finalizer: gone at once
    wait_for(
        lambda: set(pinned(clean_containerd, archives_v2.refs).values()) == {False},
        10,  # one verify interval (2 s) and the agent's reaction
        "the deleted ImageUnlock's images unpinned",
    )


def test_delete_removes_the_old_version_but_an_image_a_container_uses_and_a_missed_delete_is_caught(
    cluster, namespace, secret, on_containerd, clean_containerd, archives, archives_v2, archive_root
):
    v1 = place(archives.openssl_archive, archive_root, "v1.enc")
    v2 = place(archives_v2.openssl_archive, archive_root, "v2.enc")
    agent = on_containerd()
    cluster.create_unlock(namespace, "images", spec_for(v1, archives.version, secret, reclaimPolicy="Delete"))
    wait_for(lambda: ready_at(cluster, namespace, "images", 1), 120, "version 1 Ready")
    used, *unused = archives.refs
    clean_containerd.ctr("containers", "create", normalize_ref(used), "stopped-user", "/bin/true")
    try:
        cluster.patch_spec(namespace, "images", spec_for(v2, archives_v2.version, secret, reclaimPolicy="Delete"))
        wait_for(lambda: ready_at(cluster, namespace, "images", 2), 120, "version 2 Ready")
        wait_for(lambda: messages(cluster, namespace, "images"), 30, "the Reclaimed event")
        held = clean_containerd.images()
        assert normalize_ref(used) in held  # a container (stopped) uses it
        assert not {normalize_ref(ref) for ref in unused} & set(held)
        assert {normalize_ref(ref) for ref in archives_v2.refs} <= set(held)
        [message] = messages(cluster, namespace, "images")
        assert message.startswith(f"node node-1: removed {len(unused)} image(s) of {archives.version}; kept 1")
        wait_for(lambda: "reclaimed" in cluster.status(namespace, "images")["nodes"][0], 30, "the entry's reclaimed")
        [entry] = cluster.status(namespace, "images")["nodes"]
        assert entry["reclaimed"]["kept"] == [normalize_ref(used)]
    finally:
        clean_containerd.ctr("containers", "rm", "stopped-user")

    agent.stop()  # the delete happens while the node's agent is down: no event reaches it
    cluster.delete(namespace, "images")
    on_containerd()
    wait_for(
        lambda: not {normalize_ref(ref) for ref in archives_v2.refs} & set(clean_containerd.images()),
        30,
        "the deleted ImageUnlock's images removed by the restarted agent's sweep",
    )


def test_delete_on_docker_keeps_an_image_a_container_uses(
    cluster, namespace, secret, start_operator, clean_docker, archives, archives_v2, archive_root
):
    v1 = place(archives.openssl_archive, archive_root, "v1.enc")
    v2 = place(archives_v2.openssl_archive, archive_root, "v2.enc")
    start_operator()
    cluster.create_unlock(namespace, "images", spec_for(v1, archives.version, secret, reclaimPolicy="Delete"))
    wait_for(lambda: ready_at(cluster, namespace, "images", 1), 120, "version 1 Ready")
    used, *unused = archives.refs
    clean_docker.docker("create", "--name", "stopped-user", used, "/bin/true")
    try:
        cluster.patch_spec(namespace, "images", spec_for(v2, archives_v2.version, secret, reclaimPolicy="Delete"))
        wait_for(lambda: ready_at(cluster, namespace, "images", 2), 120, "version 2 Ready")
        wait_for(lambda: messages(cluster, namespace, "images"), 30, "the Reclaimed event")
        held = loaded(clean_docker)
        assert used in held and not set(unused) & set(held)
        assert set(archives_v2.refs) <= set(held)
    finally:
        clean_docker.docker("rm", "-f", "stopped-user")
