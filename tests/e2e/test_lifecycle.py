"""The operator on a real API server, with the real dockerd and the loopback resource API."""

from __future__ import annotations

import json
import os
import signal

import pytest

from imageunlock.kube import GROUP
from imageunlock.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH

from ..support.dockerd import loaded
from ..support.resource_api import TEST_EMAIL
from ..support.cluster import is_ready, is_stalled, spec_for, unlock_object
from ..support.operator_process import place
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e


def test_crd_is_served_and_explained(cluster, crd):
    resources = cluster.kubectl("api-resources", "--api-group", GROUP).stdout
    assert "imageunlocks" in resources and "iu" in resources
    spec = cluster.kubectl("explain", "imageunlock.spec").stdout
    for field in ("archivePath", "version", "images", "resourceApi", "runtime", "archiveSha256"):
        assert field in spec, field
    ref = cluster.kubectl("explain", "imageunlock.spec.resourceApi.credentialsSecretRef").stdout
    assert "name" in ref and "email" in ref


BAD_SPECS = {
    "relative path": ({"archivePath": "images.enc"}, "spec.archivePath"),
    "bad tag": ({"version": "1.0 beta"}, "spec.version"),
    "bad image": ({"images": ["Azaion/Flights"]}, "spec.images[0]"),
    "bad digest": ({"archiveSha256": "xyz"}, "spec.archiveSha256"),
    "unknown runtime": ({"runtime": "podman"}, "spec.runtime"),
    "no secret": ({"resourceApi": {"url": "http://x"}}, "spec.resourceApi.credentialsSecretRef"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_invalid_specs_are_refused_by_the_api_server(cluster, namespace, case):
    change, field = BAD_SPECS[case]
    spec = {**spec_for("/var/lib/imageunlock/images.enc", "1.0", "creds"), **change}
    manifest = json.dumps(unlock_object(namespace, "bad", spec))
    result = cluster.kubectl("apply", "-f", "-", input=manifest, check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def test_secret_and_imageunlock_become_ready(cluster, namespace, secret, start_operator, archives,
                                             archive_root, clean_docker, resource_api):
    path = place(archives.openssl_archive, archive_root)
    operator = start_operator()
    cluster.create_unlock(namespace, "images", spec_for(path, archives.version, secret))
    cluster.kubectl("wait", "--for=condition=Ready", "imageunlock/images", "-n", namespace, "--timeout=120s",
                    timeout=150)
    status = cluster.status(namespace, "images")
    assert status["phase"] == "Ready" and status["observedGeneration"] == 1
    assert {i["name"]: i["id"] for i in status["images"]} == archives.ids
    assert status["progress"]["text"] == "100%" and status["lastUnlockTime"]
    assert cluster.condition(namespace, "images", "Reconciling")["status"] == "False"
    assert cluster.condition(namespace, "images", "Stalled")["status"] == "False"
    assert loaded(clean_docker) == archives.ids
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1
    reasons = {e.reason for e in cluster.events(namespace, "images")}
    assert {"Unlocking", "Unlocked"} <= reasons
    table = cluster.kubectl("get", "iu", "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "PHASE", "VERSION", "READY", "PROGRESS", "AGE"]
    assert "Ready" in table and "100%" in table and archives.version in table
    assert operator.probe().get("runtime") == "reachable"
    obj = cluster.get(namespace, "images")
    assert not obj["metadata"].get("finalizers"), "no finalizer: deletion must never wait for the operator"


def test_images_present_before_the_first_unlock_are_not_vouched_for(cluster, namespace, secret, start_operator,
                                                                    archives, archive_root, clean_docker,
                                                                    resource_api):
    """Issue 8, item 4: an impostor at NAME:VERSION before the first unlock was reported Ready
    (AlreadyPresent) and its ID recorded as verified. Now the first unlock compares and replaces."""
    clean_docker.docker("load", "-i", str(archives.plaintext))
    clean_docker.docker("tag", archives.refs[1], archives.refs[0])  # impostor under the first name
    start_operator()
    cluster.create_unlock(namespace, "present", spec_for(place(archives.openssl_archive, archive_root),
                                                         archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "present"), 60, "Ready")
    assert cluster.condition(namespace, "present", "Ready")["reason"] == "Unlocked"
    assert loaded(clean_docker) == archives.ids  # the impostor's tag now holds the archive's image
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1


def test_bad_credentials_stall_without_a_hot_loop(cluster, namespace, start_operator, archives, archive_root,
                                                  clean_docker, resource_api):
    cluster.core.create_namespaced_secret(namespace, {
        "metadata": {"name": "wrong"}, "stringData": {"email": TEST_EMAIL, "password": "not-it"}})
    path = place(archives.openssl_archive, archive_root)
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    cluster.create_unlock(namespace, "creds", spec_for(path, archives.version, "wrong"))
    wait_for(lambda: is_stalled(cluster, namespace, "creds"), 60, "Stalled")
    stalled = cluster.condition(namespace, "creds", "Stalled")
    assert stalled["reason"] == "AuthenticationFailed" and "credentials" in stalled["message"]
    assert cluster.status(namespace, "creds")["phase"] == "Failed"
    assert cluster.condition(namespace, "creds", "Ready")["status"] == "False"
    logins = resource_api.calls[LOGIN_PATH]
    wait_for(lambda: any(e.type == "Warning" and e.reason == "AuthenticationFailed"
                         for e in cluster.events(namespace, "creds")), 10, "a Warning event")
    assert resource_api.calls[LOGIN_PATH] == logins == 1, "a permanent error must not be retried"
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 0 and loaded(clean_docker) == {}


def test_missing_secret_stalls_with_an_actionable_message(cluster, namespace, start_operator, archives,
                                                          archive_root):
    path = place(archives.openssl_archive, archive_root)
    start_operator()
    cluster.create_unlock(namespace, "nosecret", spec_for(path, archives.version, "does-not-exist"))
    wait_for(lambda: is_stalled(cluster, namespace, "nosecret"), 60, "Stalled")
    message = cluster.condition(namespace, "nosecret", "Stalled")["message"]
    assert "does-not-exist" in message and "not found" in message


def test_resource_api_5xx_is_retried_until_ready(cluster, namespace, secret, start_operator, archives,
                                                 archive_root, clean_docker, resource_api):
    resource_api.fail(LOGIN_PATH, 503, times=3)
    path = place(archives.openssl_archive, archive_root)
    start_operator()
    cluster.create_unlock(namespace, "flaky", spec_for(path, archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "flaky"), 90, "Ready after retries")
    assert resource_api.calls[LOGIN_PATH] == 4 and resource_api.calls[KEY_FRAGMENT_PATH] == 1
    warnings = [e for e in cluster.events(namespace, "flaky") if e.type == "Warning"]
    assert [(e.count, "503" in e.message) for e in warnings] == [(3, True)], warnings  # one, aggregated
    assert loaded(clean_docker) == archives.ids


def test_version_change_is_reconciled(cluster, namespace, secret, start_operator, archives, archives_v2,
                                      archive_root, clean_docker):
    old = place(archives.own_archive, archive_root, "v1.enc")
    new = place(archives_v2.own_archive, archive_root, "v2.enc")
    start_operator()
    cluster.create_unlock(namespace, "versions", spec_for(old, archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "versions"), 60, "Ready at v1")
    cluster.patch_spec(namespace, "versions", {"version": archives_v2.version, "archivePath": new})
    wait_for(lambda: cluster.status(namespace, "versions").get("observedGeneration") == 2
             and is_ready(cluster, namespace, "versions"), 60, "Ready at generation 2")
    status = cluster.status(namespace, "versions")
    assert {i["name"]: i["id"] for i in status["images"]} == archives_v2.ids
    assert cluster.condition(namespace, "versions", "Ready")["observedGeneration"] == 2


def test_removed_image_is_restored_by_reverification(cluster, namespace, secret, start_operator, archives,
                                                     archive_root, clean_docker, resource_api):
    path = place(archives.openssl_archive, archive_root)
    start_operator()
    cluster.create_unlock(namespace, "keep", spec_for(path, archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "keep"), 60, "Ready")
    clean_docker.docker("rmi", archives.refs[2])
    wait_for(lambda: loaded(clean_docker) == archives.ids, 60, "the removed image to come back")
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 2
    wait_for(lambda: is_ready(cluster, namespace, "keep"), 30, "Ready again")


def test_operator_killed_mid_load_recovers_cleanly(cluster, namespace, secret, start_operator, big_archives,
                                                   archive_root, clean_docker):
    path = place(big_archives.openssl_archive, archive_root)
    before = sorted(os.listdir(archive_root))
    operator = start_operator(IMAGEUNLOCK_PROGRESS_INTERVAL="0.05")
    cluster.create_unlock(namespace, "big", spec_for(path, big_archives.version, secret,
                                                     images=big_archives.names))
    wait_for(lambda: cluster.status(namespace, "big").get("phase") == "Loading"
             and 0 < cluster.status(namespace, "big")["progress"]["percent"] < 90, 60, "mid-load", interval=0.02)
    operator.stop(signal.SIGKILL)
    assert sorted(os.listdir(archive_root)) == before
    assert unlock_leftovers(operator.tmpdir) == []
    restarted = start_operator()
    wait_for(lambda: is_ready(cluster, namespace, "big"), 120, "Ready after restart")
    assert loaded(clean_docker) == big_archives.ids  # each image once, nothing half-loaded
    dangling = clean_docker.docker("images", "-a", "-q", "--filter", "dangling=true", text=True).stdout.split()
    assert dangling == []
    assert unlock_leftovers(restarted.tmpdir) == []


def unlock_leftovers(tmpdir) -> list[str]:
    """Files in the operator's TMPDIR other than the kubernetes client's copies of the
    kubeconfig's inline certificates (it removes those at exit, which SIGKILL skips; an
    in-cluster operator has none). The unlock itself must never write a file."""
    return [name for name in os.listdir(tmpdir)
            if not (tmpdir / name).read_bytes().startswith(b"-----BEGIN ")]


def test_delete_while_operator_is_down_does_not_hang(cluster, namespace, secret, start_operator, archives,
                                                     archive_root):
    path = place(archives.openssl_archive, archive_root)
    operator = start_operator()
    cluster.create_unlock(namespace, "gone", spec_for(path, archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "gone"), 60, "Ready")
    operator.stop()
    cluster.delete(namespace, "gone")
    wait_for(lambda: "gone" not in [i["metadata"]["name"] for i in cluster.list(namespace)], 15,
             "deletion without the operator")
