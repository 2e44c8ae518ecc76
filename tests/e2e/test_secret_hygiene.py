"""The credentials and the key go nowhere else: never to a host other than the allowed
resource API (a look-alike URL, a redirect, a spec naming another server: issue 8, items 1 and
2; loopback servers stand in for the host an attacker wants them sent to), and never into
status, events, annotations or the operator's log."""

from __future__ import annotations

import base64
import contextlib
import json
import os

import pytest

from imageunlock.engine.crypto import derive_key
from imageunlock.engine.keys.resource_api import LOGIN_PATH
from imageunlock.kube.client import VERSION

from ..support.cluster import CRD_FILE, CRD_NAME, is_ready, is_stalled, spec_for, stalled_with, unlock_object
from ..support.operator_process import place
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from ..support.scripted_http import ScriptedServer, respond
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
    patch = [
        {
            "op": "remove",
            "path": f"/spec/versions/{index}/schema/openAPIV3Schema/properties/spec/properties/"
            "resourceApi/properties/url/pattern",
        }
    ]
    assert "pattern" in url
    cluster.kubectl("patch", "crd", CRD_NAME, "--type=json", "-p", json.dumps(patch))
    try:
        yield
    finally:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))


def test_lookalike_url_is_refused_by_the_api_server(cluster, namespace, secret, resource_api, collector, archives):
    host_a, host_b = collector.url.removeprefix("http://"), resource_api.url.removeprefix("http://")
    body = unlock_object(
        namespace,
        "bypass",
        {
            **spec_for("/x.enc", archives.version, secret),
            "resourceApi": {"url": f"http://{host_a}\\@{host_b}", "credentialsSecretRef": {"name": secret}},
        },
    )
    result = cluster.kubectl("create", "-f", "-", input=json.dumps(body), check=False)
    assert result.returncode != 0 and "spec.resourceApi.url" in result.stderr


@pytest.mark.parametrize("form", ["{a}\\@{b}", "{a}\\\\@{b}", "{a}#@{b}", "{a}?@{b}"])
def test_lookalike_url_never_reaches_the_other_host(
    cluster, namespace, secret, start_operator, archives, archive_root, resource_api, collector, relaxed_crd, form
):
    """Item 1: 'http://HOST-A\\@HOST-B' passed the allow-list (urlsplit reads HOST-B) while
    requests connected to HOST-A, which got the login JSON with the password."""
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    url = "http://" + form.format(a=collector.url.removeprefix("http://"), b=resource_api.url.removeprefix("http://"))
    spec = {
        **spec_for(place(archives.openssl_archive, archive_root), archives.version, secret),
        "resourceApi": {"url": url, "credentialsSecretRef": {"name": secret}},
    }
    cluster.create_unlock(namespace, "bypass", spec)
    message = stalled_with(cluster, namespace, "bypass", "InvalidConfiguration")
    assert "spec.resourceApi.url" in message
    assert sum(collector.calls.values()) == 0 and sum(resource_api.calls.values()) == 0


def test_redirect_from_the_allowed_api_sends_nothing_elsewhere(
    cluster, namespace, secret, start_operator, archives, archive_root, collector
):
    """Item 2: a 3xx from the allowed API made requests re-post the credentials to Location."""

    def redirect(request, out):
        respond(out, 307, headers={"Location": collector.url + request.path})

    with ScriptedServer(redirect) as allowed:
        start_operator(RESOURCE_API_URL=allowed.url, IMAGEUNLOCK_VERIFY_INTERVAL="3600")
        cluster.create_unlock(
            namespace, "moved", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
        )
        message = stalled_with(cluster, namespace, "moved", "ResourceApiRejected")
        assert "redirect" in message and collector.url not in message
        assert len(allowed.requests) == 1, "a redirect is permanent: no retry loop"
    assert sum(collector.calls.values()) == 0


def test_credentials_go_only_to_allowed_resource_apis(
    cluster, namespace, secret, start_operator, archives, archive_root, resource_api, collector
):
    """Whoever may create an ImageUnlock must not be able to send a Secret's password to a
    server of their choosing."""
    start_operator()
    path = place(archives.openssl_archive, archive_root)
    cluster.create_unlock(
        namespace,
        "exfil",
        {
            **spec_for(path, archives.version, secret, images=["azaion/none"]),
            "resourceApi": {"url": collector.url, "credentialsSecretRef": {"name": secret}},
        },
    )
    message = stalled_with(cluster, namespace, "exfil", "InvalidConfiguration")
    assert "not an allowed resource API" in message
    assert collector.calls[LOGIN_PATH] == 0 and resource_api.calls[LOGIN_PATH] == 0


def _forms(secret: bytes) -> set[str]:
    text = {secret.hex(), base64.b64encode(secret).decode()}
    with contextlib.suppress(UnicodeDecodeError):
        text.add(secret.decode())
    return {t for t in text if len(t) >= 8}


def test_canary_secrets_never_leak(
    cluster, namespace, start_operator, archives, archive_root, clean_docker, resource_api
):
    canary = "canary-pw-" + os.urandom(6).hex()
    resource_api.password = canary
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "canary"}, "stringData": {"email": TEST_EMAIL, "password": canary}}
    )
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "wrong"}, "stringData": {"email": TEST_EMAIL, "password": canary + "x"}}
    )
    operator = start_operator(IMAGEUNLOCK_LOG_LEVEL="debug")
    path = place(archives.openssl_archive, archive_root)
    cluster.create_unlock(namespace, "good", spec_for(path, archives.version, "canary"))
    # an image nobody loads, so "badcreds" cannot take the fast path once "good" is Ready
    cluster.create_unlock(namespace, "badcreds", spec_for(path, archives.version, "wrong", images=["azaion/none"]))
    wait_for(lambda: is_ready(cluster, namespace, "good"), 60, "Ready")
    wait_for(lambda: is_stalled(cluster, namespace, "badcreds"), 60, "Stalled")
    resource_api.fragment = b"canary-fragment-" + os.urandom(8)  # a wrong key: the failure path too
    cluster.create_unlock(
        namespace,
        "badkey",
        spec_for(
            place(archives.own_archive, archive_root, "b.enc"), archives.version, "canary", images=["azaion/other"]
        ),
    )
    wait_for(lambda: is_stalled(cluster, namespace, "badkey"), 60, "Stalled on the wrong key")

    needles = {canary, canary + "x"} | _forms(archives.fragment) | _forms(derive_key(archives.fragment))
    needles |= _forms(resource_api.fragment) | set(resource_api.issued)
    haystacks = {
        "objects (status, annotations)": json.dumps(cluster.list(namespace)),
        "events": json.dumps([e.to_dict() for e in cluster.core.list_namespaced_event(namespace).items], default=str),
        "operator log (debug)": operator.log(),
    }
    assert "DEBUG" in haystacks["operator log (debug)"] or "debug" in haystacks["operator log (debug)"].lower()
    for where, text in haystacks.items():
        for needle in needles:
            assert needle not in text, f"a secret leaked into {where}"
