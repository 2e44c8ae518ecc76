"""The operator loading into containerd (IMAGEUNLOCK_RUNTIME=containerd): the real API server,
sid's containerd, the loopback resource API; what kubelet would see, asked over the CRI."""

from __future__ import annotations

import pytest

from imageunlock.engine.refs import normalize_ref

from ..support.cluster import is_ready, spec_for, stalled_with
from ..support.containerd import Cri
from ..support.dockerd import loaded
from ..support.operator_process import place
from ..support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.containerd]


def test_operator_unlocks_into_containerd_pinned(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_containerd, clean_docker, resource_api
):
    path = place(archives.openssl_archive, archive_root)
    operator = start_operator(
        IMAGEUNLOCK_RUNTIME="containerd",
        IMAGEUNLOCK_CONTAINERD_ADDRESS=str(clean_containerd.socket),
        PATH=clean_containerd.env()["PATH"],  # sid's ctr first, as the operator image would ship it
    )
    cluster.create_unlock(namespace, "named", spec_for(path, archives.version, secret, runtime="containerd"))
    cluster.create_unlock(namespace, "auto", spec_for(path, archives.version, secret))  # CRD default: auto
    cluster.create_unlock(namespace, "docker", spec_for(path, archives.version, secret, runtime="docker"))
    for name in ("named", "auto"):
        wait_for(lambda name=name: is_ready(cluster, namespace, name), 120, f"{name} Ready")
        status = cluster.status(namespace, name)
        assert {i["name"]: i["id"] for i in status["images"]} == archives.ids
    # in containerd's k8s.io namespace, pinned, with the verified IDs: what kubelet runs pods from
    cri = Cri(clean_containerd.socket, clean_containerd.build.cri_proto)
    try:
        for ref, image_id in archives.ids.items():
            seen = cri.image_status(ref)
            assert seen is not None and seen.id == image_id and seen.pinned, ref
            assert normalize_ref(ref) in seen.repo_tags
    finally:
        cri.close()
    assert loaded(clean_docker) == {}  # and nothing went to the Docker Engine
    # a resource naming a runtime this operator does not load into stalls, saying why
    message = stalled_with(cluster, namespace, "docker", "InvalidConfiguration")
    assert "IMAGEUNLOCK_RUNTIME" in message and "use auto" in message
    assert operator.probe().get("runtime") == "reachable"
