"""Repair without the network (issue 20, item 3) on the real API server, dockerd and loopback
resource API: with ``spec.keyCacheSeconds`` a removed image is restored while the resource API
is down, with no request to it; without it the node waits (retrying) for the API."""

from __future__ import annotations

import base64
import hashlib

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH

from ..support.cluster import is_ready, spec_for
from ..support.dockerd import loaded
from ..support.operator_process import place
from ..support.wait import wait_for
from .test_faults import retrying

pytestmark = pytest.mark.e2e


@pytest.fixture
def api_down(resource_api):
    """``down()``: every login and key request fails (503) from now until the test ends."""

    def down() -> None:
        resource_api.fail_until_stopped(LOGIN_PATH, 503)
        resource_api.fail_until_stopped(KEY_FRAGMENT_PATH, 503)

    yield down
    resource_api.stop_failing(LOGIN_PATH)
    resource_api.stop_failing(KEY_FRAGMENT_PATH)


def test_with_key_cache_seconds_a_removed_image_is_restored_while_the_api_is_down(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api, api_down
):
    agent = start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="1")
    spec = spec_for(place(archives.openssl_archive, archive_root), archives.version, secret, keyCacheSeconds=600)
    cluster.create_unlock(namespace, "offline", spec)
    wait_for(lambda: is_ready(cluster, namespace, "offline"), 60, "Ready")
    api_down()
    before = dict(resource_api.calls)
    clean_docker.docker("rmi", archives.refs[2])
    wait_for(
        lambda: archives.refs[2] in loaded(clean_docker) and is_ready(cluster, namespace, "offline"),
        60,
        "the image restored with the resource API down",
    )
    assert loaded(clean_docker) == archives.ids
    assert dict(resource_api.calls) == before  # not one request: the key came from memory
    # the key (SHA-256 of the fragment) and the fragment appear in no log line and no status
    seen = agent.log() + str(cluster.get(namespace, "offline"))
    for secret_bytes in (archives.fragment, hashlib.sha256(archives.fragment).digest()):
        assert secret_bytes.hex() not in seen and base64.b64encode(secret_bytes).decode() not in seen


def test_without_key_cache_seconds_the_node_waits_for_the_api(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api, api_down
):
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="1")
    cluster.create_unlock(
        namespace, "online", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "online"), 60, "Ready")
    api_down()
    clean_docker.docker("rmi", archives.refs[2])
    wait_for(lambda: retrying(cluster.status(namespace, "online"), 2), 60, "retrying while the API is down")
    assert archives.refs[2] not in loaded(clean_docker)
    resource_api.stop_failing(LOGIN_PATH)
    resource_api.stop_failing(KEY_FRAGMENT_PATH)
    wait_for(
        lambda: is_ready(cluster, namespace, "online") and loaded(clean_docker) == archives.ids,
        60,
        "Ready again once the API answers",
    )
