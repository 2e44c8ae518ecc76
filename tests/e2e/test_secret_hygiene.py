"""Issue 8's holes, each proven closed end to end: the real operator process, the local API
server, a private dockerd and real loopback servers standing in for a hostile resource API or
the host an attacker wants the credentials sent to."""

from __future__ import annotations

import json
import time

import pytest

from imageunlock.errors import ARCHIVE_ERROR_MESSAGE
from imageunlock.kube import VERSION
from imageunlock.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH

from ..support.dockerd import loaded
from ..support import tamper
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from ..support.scripted_http import ScriptedServer, respond
from ..support.cluster import CRD_FILE, CRD_NAME, is_ready, spec_for, stalled_with, unlock_object
from ..support.operator_process import place
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def collector(archives):
    """The host an attacker wants the credentials sent to: a full, working resource API."""
    with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as api:
        yield api


@pytest.fixture
def relaxed_crd(cluster):
    """The CRD without its URL pattern, as on a cluster still running an older CRD: then only
    the operator stands between a look-alike URL and the credentials."""
    crd = json.loads(cluster.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    url = props["resourceApi"]["properties"]["url"]
    index = [v["name"] for v in crd["spec"]["versions"]].index(VERSION)
    patch = [{"op": "remove", "path": f"/spec/versions/{index}/schema/openAPIV3Schema/properties/spec/properties/"
                                      "resourceApi/properties/url/pattern"}]
    assert "pattern" in url
    cluster.kubectl("patch", "crd", CRD_NAME, "--type=json", "-p", json.dumps(patch))
    try:
        yield
    finally:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))


def test_lookalike_url_is_refused_by_the_api_server(cluster, namespace, secret, resource_api, collector, archives):
    host_a, host_b = collector.url.removeprefix("http://"), resource_api.url.removeprefix("http://")
    body = unlock_object(namespace, "bypass", {
        **spec_for("/x.enc", archives.version, secret),
        "resourceApi": {"url": f"http://{host_a}\\@{host_b}", "credentialsSecretRef": {"name": secret}}})
    result = cluster.kubectl("create", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0 and "spec.resourceApi.url" in result.stderr


@pytest.mark.parametrize("form", ["{a}\\@{b}", "{a}\\\\@{b}", "{a}#@{b}", "{a}?@{b}"])
def test_lookalike_url_never_reaches_the_other_host(cluster, namespace, secret, start_operator, archives,
                                                    archive_root, resource_api, collector, relaxed_crd, form):
    """Item 1: 'http://HOST-A\\@HOST-B' passed the allow-list (urlsplit reads HOST-B) while
    requests connected to HOST-A, which got the login JSON with the password."""
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    url = "http://" + form.format(a=collector.url.removeprefix("http://"), b=resource_api.url.removeprefix("http://"))
    spec = {**spec_for(place(archives.openssl_archive, archive_root), archives.version, secret),
            "resourceApi": {"url": url, "credentialsSecretRef": {"name": secret}}}
    cluster.create_unlock(namespace, "bypass", spec)
    message = stalled_with(cluster, namespace, "bypass", "InvalidConfiguration")
    assert "spec.resourceApi.url" in message
    assert sum(collector.calls.values()) == 0 and sum(resource_api.calls.values()) == 0


def test_redirect_from_the_allowed_api_sends_nothing_elsewhere(cluster, namespace, secret, start_operator,
                                                               archives, archive_root, collector):
    """Item 2: a 3xx from the allowed API made requests re-post the credentials to Location."""
    def redirect(request, out):
        respond(out, 307, headers={"Location": collector.url + request.path})

    with ScriptedServer(redirect) as allowed:
        start_operator(RESOURCE_API_URL=allowed.url, IMAGEUNLOCK_VERIFY_INTERVAL="3600")
        cluster.create_unlock(namespace, "moved", spec_for(place(archives.openssl_archive, archive_root),
                                                           archives.version, secret))
        message = stalled_with(cluster, namespace, "moved", "ResourceApiRejected")
        assert "redirect" in message and collector.url not in message
        assert len(allowed.requests) == 1, "a redirect is permanent: no retry loop"
    assert sum(collector.calls.values()) == 0


def test_archive_cannot_move_tags_it_was_not_asked_for(cluster, namespace, secret, start_operator, archives,
                                                       archive_root, clean_docker, resource_api, tmp_path):
    """Item 3: every RepoTag in manifest.json was applied, so an archive made with the right key
    could overwrite another team's image."""
    victim = "victim/app:prod"
    clean_docker.docker("load", "-i", str(archives.plaintext))
    clean_docker.docker("tag", archives.refs[1], victim)
    for ref in archives.refs:
        clean_docker.docker("rmi", ref)
    before = loaded(clean_docker)
    assert list(before) == [victim]
    archive = tamper.rewrite(archives.plaintext, tmp_path / "foreign.enc", archives.fragment,
                             tamper.add_tags([victim, "nginx:latest"]))
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    cluster.create_unlock(namespace, "foreign", spec_for(place(archive, archive_root), archives.version, secret))
    message = stalled_with(cluster, namespace, "foreign", "ArchiveHasForeignTags")
    assert victim in message
    assert loaded(clean_docker) == before, "nothing loaded, the victim's tag unmoved"
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1


def test_transient_failure_during_reverification_is_retried_to_ready(cluster, namespace, secret, start_operator,
                                                                     archives, archive_root, clean_docker,
                                                                     resource_api):
    """Item 5: a transient failure during re-verification left a working phase, and the loop
    then skipped the resource forever (no API call, no write, the image stayed absent)."""
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="1", IMAGEUNLOCK_RETRY_BASE="1", IMAGEUNLOCK_RETRY_MAX="2")
    cluster.create_unlock(namespace, "heal", spec_for(place(archives.openssl_archive, archive_root),
                                                      archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "heal"), 60, "Ready")
    resource_api.fail(KEY_FRAGMENT_PATH, 503, times=3)
    clean_docker.docker("rmi", archives.refs[2])
    wait_for(lambda: "retrying in" in cluster.status(namespace, "heal").get("message", ""), 30,
             "a truthful retrying status")
    wait_for(lambda: is_ready(cluster, namespace, "heal") and loaded(clean_docker) == archives.ids, 60,
             "Ready again with the image back")
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1 + 3 + 1  # first unlock, three 503s, the success


@pytest.mark.parametrize("edit, reason, text", [
    (tamper.nested_manifest(), "ArchiveInvalid", ARCHIVE_ERROR_MESSAGE),
    (tamper.layer_not_a_tar, "ArchiveRejected", "rebuild it"),
], ids=["deeply-nested-manifest", "layer-not-a-tar"])
def test_archive_content_failures_stall_instead_of_retrying(cluster, namespace, secret, start_operator, archives,
                                                            archive_root, resource_api, tmp_path, edit, reason, text):
    """Item 7: a RecursionError from a deeply nested manifest.json, and the Engine refusing a
    layer, were transient: login + key + full upload every backoff, forever."""
    archive = tamper.rewrite(archives.plaintext, tmp_path / "hostile.enc", archives.fragment, edit)
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="1")
    cluster.create_unlock(namespace, "content", spec_for(place(archive, archive_root), archives.version, secret))
    assert text in stalled_with(cluster, namespace, "content", reason, timeout=90)
    # Stalled on unchanged inputs: the re-verification loop (every second here) must not try
    # again. An absence cannot be awaited; three intervals is the bounded window.
    wait_for(lambda: resource_api.calls[KEY_FRAGMENT_PATH] >= 1, 5, "the one key request")
    time.sleep(3)
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1 and resource_api.calls[LOGIN_PATH] == 1
