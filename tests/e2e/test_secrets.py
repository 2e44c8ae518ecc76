"""Reacting to Secrets on the real API server (issue 21, item 5): a Secret an ImageUnlock
names, created or fixed, re-checks it at once, not at the verify interval."""

from __future__ import annotations

import time

import pytest

from imageunlock.engine.keys.resource_api import LOGIN_PATH

from ..support.cluster import is_ready, spec_for, stalled_with
from ..support.operator_process import place
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e

LONG = "300"  # the verify interval: a re-check that waits for it would fail these tests


def test_a_missing_secret_created_makes_the_unlock_ready_within_seconds(
    cluster, namespace, start_operator, archives, archive_root, resource_api
):
    path = place(archives.openssl_archive, archive_root)
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL=LONG)
    cluster.create_unlock(namespace, "later", spec_for(path, archives.version, "loader-creds"))
    assert "not found" in stalled_with(cluster, namespace, "later", "InvalidConfiguration")
    # No wait for the Secret's watch to open: a Secret that already exists when its watch
    # begins is reported by the watch's first list, and the object is looked at then.
    created = time.monotonic()
    cluster.core.create_namespaced_secret(
        namespace,
        {"metadata": {"name": "loader-creds"}, "stringData": {"email": TEST_EMAIL, "password": TEST_PASSWORD}},
    )
    wait_for(lambda: is_ready(cluster, namespace, "later"), 30, "Ready after the Secret was created")
    assert time.monotonic() - created < 30  # seconds, far from the 300 s interval


def test_a_fixed_password_makes_the_unlock_ready_within_seconds(
    cluster, namespace, start_operator, archives, archive_root, resource_api
):
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "loader-creds"}, "stringData": {"email": TEST_EMAIL, "password": "wrong"}}
    )
    path = place(archives.openssl_archive, archive_root)
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL=LONG)
    cluster.create_unlock(namespace, "fixed", spec_for(path, archives.version, "loader-creds"))
    stalled_with(cluster, namespace, "fixed", "AuthenticationFailed")
    logins = resource_api.calls[LOGIN_PATH]
    cluster.core.patch_namespaced_secret("loader-creds", namespace, {"stringData": {"password": TEST_PASSWORD}})
    wait_for(lambda: is_ready(cluster, namespace, "fixed"), 30, "Ready after the password was fixed")
    assert resource_api.calls[LOGIN_PATH] == logins + 1  # one login for the fix, no retry loop before it


def test_a_fleet_with_a_wrong_password_costs_one_refused_login_per_secret_version(
    cluster, namespace, start_agent, archives, archive_root, clean_docker, resource_api
):
    """Three agents (three Nodes on one dockerd): the Secret changes, still wrong, and the
    resource API sees one refused login for the fleet, not three; then fixed, all are Ready."""
    nodes = [f"verdict-{i}" for i in range(3)]
    labels = {"imageunlock-test": namespace}
    for node in nodes:
        cluster.ensure_node(node, "docker://24.0.9", labels)
    try:
        for node in nodes:
            start_agent(node, archive_root, IMAGEUNLOCK_DOCKER_HOST=clean_docker.url, IMAGEUNLOCK_VERIFY_INTERVAL=LONG)
        cluster.core.create_namespaced_secret(
            namespace, {"metadata": {"name": "loader-creds"}, "stringData": {"email": TEST_EMAIL, "password": "no"}}
        )
        path = place(archives.openssl_archive, archive_root)
        spec = spec_for(path, archives.version, "loader-creds", nodeSelector={"matchLabels": labels})
        cluster.create_unlock(namespace, "shared", spec)

        def refused_on_all(version: str | None = None) -> bool:
            entries = cluster.entries(namespace, "shared")
            return len(entries) == 3 and all(
                e.get("reason") == "AuthenticationFailed"
                and (version is None or e.get("loginRefusedVersion") == version)
                for e in entries.values()
            )

        wait_for(refused_on_all, 60, "every node Stalled on the wrong password")
        first = resource_api.calls[LOGIN_PATH]
        assert 1 <= first <= 3  # a new object's first logins are not shared (no entries yet)
        changed = cluster.core.patch_namespaced_secret(
            "loader-creds", namespace, {"stringData": {"password": "still-not-it"}}
        )
        wait_for(lambda: refused_on_all(changed.metadata.resource_version), 60, "the new verdict on every node")
        assert resource_api.calls[LOGIN_PATH] == first + 1  # one refused login for three nodes
        cluster.core.patch_namespaced_secret("loader-creds", namespace, {"stringData": {"password": TEST_PASSWORD}})
        wait_for(
            lambda: {e.get("phase") for e in cluster.entries(namespace, "shared").values()} == {"Ready"},
            60,
            "every node Ready once the password is right",
        )
    finally:
        for node in nodes:
            cluster.delete_node(node)
