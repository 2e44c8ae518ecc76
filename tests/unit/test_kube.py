"""The Kubernetes adapter (KubernetesApi) against small fakes of the generated CoreV1Api and
CustomObjectsApi: Secret decoding, error classification, status patches and events."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import MaxRetryError, ProtocolError

from imageunlock.errors import ConfigurationError, KubernetesUnavailableError
from imageunlock.kube.client import GROUP, KIND, PLURAL, VERSION, KubernetesApi

NS = "ns"
EMAIL, PASSWORD = "edge@example.test", "s3cret-pw"


def b64(value: bytes | str) -> str:
    return base64.b64encode(value.encode() if isinstance(value, str) else value).decode()


def api_error(status: int) -> ApiException:
    error = ApiException(status=status, reason="Some Reason")
    error.body = '{"message": "internal detail: token=abc123"}'
    return error


class FakeCore:
    """``read_namespaced_secret`` and ``create_namespaced_event`` of CoreV1Api."""

    def __init__(self) -> None:
        self.secret: kubernetes.client.V1Secret | None = None
        self.error: Exception | None = None
        self.events: list[tuple[str, kubernetes.client.CoreV1Event]] = []
        self.expired: set[str] = set()  # events the API server has dropped (their TTL ran out)

    def read_namespaced_secret(self, name: str, namespace: str) -> kubernetes.client.V1Secret:
        if self.error is not None:
            raise self.error
        assert self.secret is not None and (name, namespace) == ("creds", NS)
        return self.secret

    def create_namespaced_event(self, namespace: str, body: kubernetes.client.CoreV1Event) -> None:
        if self.error is not None:
            raise self.error
        self.events.append((namespace, body))

    def patch_namespaced_event(self, name: str, namespace: str, body: dict[str, Any], **kwargs: Any) -> None:
        if self.error is not None:
            raise self.error
        [event] = [e for ns, e in self.events if (ns, e.metadata.name) == (namespace, name)]
        if event.metadata.name in self.expired:
            raise api_error(404)
        assert kwargs == {"_content_type": "application/merge-patch+json"}
        event.count, event.last_timestamp = body["count"], body["lastTimestamp"]


class FakeCustom:
    """``patch_namespaced_custom_object_status`` of CustomObjectsApi."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.patches: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def patch_namespaced_custom_object_status(self, *args: Any, **kwargs: Any) -> None:
        if self.error is not None:
            raise self.error
        self.patches.append((args, kwargs))


@pytest.fixture
def kube() -> Iterator[KubernetesApi]:
    api = KubernetesApi(api_client=kubernetes.client.ApiClient())
    api.core, api.custom = FakeCore(), FakeCustom()
    try:
        yield api
    finally:
        api.close()


def with_secret(kube: KubernetesApi, data: dict[str, str] | None, version: str = "4711") -> None:
    kube.core.secret = kubernetes.client.V1Secret(
        data=data, metadata=kubernetes.client.V1ObjectMeta(name="creds", namespace=NS, resource_version=version)
    )


# -- read_credentials ----------------------------------------------------------------------


def test_credentials_are_decoded_from_base64_without_the_trailing_newline_of_echo(kube):
    with_secret(kube, {"email": b64(EMAIL), "password": b64(PASSWORD + "\n")})
    creds = kube.read_credentials(NS, "creds")
    assert (creds.email, creds.password) == (EMAIL, PASSWORD)
    assert PASSWORD not in repr(creds)


@pytest.mark.parametrize(
    "data, named",
    [
        (None, "email, password"),
        ({}, "email, password"),
        ({"email": b64(EMAIL)}, "password"),
        ({"email": b64(EMAIL), "password": ""}, "password"),
        ({"password": b64(PASSWORD)}, "email"),
    ],
)
def test_missing_keys_are_a_configuration_error_naming_them(kube, data, named):
    with_secret(kube, data)
    with pytest.raises(ConfigurationError, match=f"lacks key\\(s\\) {named};"):
        kube.read_credentials(NS, "creds")


@pytest.mark.parametrize(
    "password, problem",
    [
        ("not base64!", "not valid base64"),
        (b64(b"\xff\xfe" + PASSWORD.encode()), "not UTF-8"),
        (b64("\n"), "is empty"),
        (b64("p" * 4097), "larger than 4096 bytes"),
    ],
)
def test_a_bad_password_value_is_a_configuration_error_that_does_not_echo_it(kube, password, problem):
    with_secret(kube, {"email": b64(EMAIL), "password": password})
    with pytest.raises(ConfigurationError) as caught:
        kube.read_credentials(NS, "creds")
    assert problem in caught.value.message and "'password'" in caught.value.message
    assert password not in caught.value.message and PASSWORD not in caught.value.message


def test_values_up_to_the_size_caps_are_accepted(kube):
    email, password = "e" * 1024, "p" * 4096
    with_secret(kube, {"email": b64(email), "password": b64(password)})
    assert kube.read_credentials(NS, "creds").password == password
    with_secret(kube, {"email": b64(email + "e"), "password": b64(password)})
    with pytest.raises(ConfigurationError, match="'email' is larger than 1024 bytes"):
        kube.read_credentials(NS, "creds")


@pytest.mark.parametrize("status, says", [(404, "not found"), (403, "not allowed")])
def test_an_absent_or_forbidden_secret_is_a_configuration_error(kube, status, says):
    kube.core.error = api_error(status)
    with pytest.raises(ConfigurationError) as caught:
        kube.read_credentials(NS, "creds")
    assert says in caught.value.message and f"Secret {NS}/creds" in caught.value.message
    assert not caught.value.transient


@pytest.mark.parametrize(
    "error",
    [
        api_error(500),
        api_error(503),
        api_error(429),
        MaxRetryError(None, "https://kube/api", "refused"),
        ProtocolError("connection aborted"),
        ConnectionRefusedError(111, "refused"),
        TimeoutError("timed out"),
    ],
)
def test_server_and_connection_failures_are_transient_and_echo_no_body(kube, error):
    kube.core.error = error
    with pytest.raises(KubernetesUnavailableError) as caught:
        kube.read_credentials(NS, "creds")
    assert caught.value.transient and "abc123" not in caught.value.message


# -- secret_version ------------------------------------------------------------------------


def test_secret_version_is_the_resource_version(kube):
    with_secret(kube, {"email": b64(EMAIL), "password": b64(PASSWORD)}, version="4711")
    assert kube.secret_version(NS, "creds") == "4711"


@pytest.mark.parametrize("status", [403, 404])
def test_secret_version_of_an_absent_or_forbidden_secret_is_none(kube, status):
    kube.core.error = api_error(status)
    assert kube.secret_version(NS, "creds") is None


@pytest.mark.parametrize("error", [api_error(500), ConnectionResetError(104, "reset")])
def test_secret_version_when_the_api_server_fails_is_transient(kube, error):
    kube.core.error = error
    with pytest.raises(KubernetesUnavailableError):
        kube.secret_version(NS, "creds")


# -- patch_status --------------------------------------------------------------------------


def test_patch_status_merge_patches_the_status_subresource(kube):
    kube.patch_status(NS, "iu", {"phase": "Ready", "images": None})
    [(args, kwargs)] = kube.custom.patches
    assert args == (GROUP, VERSION, NS, PLURAL, "iu", {"status": {"phase": "Ready", "images": None}})
    assert kwargs == {"_content_type": "application/merge-patch+json"}


def test_patch_status_of_an_object_deleted_meanwhile_is_ignored(kube):
    kube.custom.error = api_error(404)
    assert kube.patch_status(NS, "iu", {"phase": "Ready"}) is None


@pytest.mark.parametrize("error", [api_error(500), api_error(409), BrokenPipeError(32, "pipe")])
def test_patch_status_failures_are_transient(kube, error):
    kube.custom.error = error
    with pytest.raises(KubernetesUnavailableError) as caught:
        kube.patch_status(NS, "iu", {"phase": "Ready"})
    assert "abc123" not in caught.value.message


# -- post_event ----------------------------------------------------------------------------

OBJ = {"metadata": {"namespace": NS, "name": "iu", "uid": "uid-1"}}


def test_post_event_records_an_event_on_the_imageunlock(kube):
    kube.post_event(OBJ, "Warning", "ArchiveInvalid", "archive could not be unlocked")
    kube.post_event(OBJ, "Normal", "Unlocked", "done")
    (namespace, event), (_, second) = kube.core.events
    assert namespace == NS and event.metadata.namespace == NS
    assert event.metadata.name.startswith("iu.") and event.metadata.name != second.metadata.name
    involved = event.involved_object
    assert (involved.kind, involved.api_version, involved.name, involved.namespace, involved.uid) == (
        KIND,
        f"{GROUP}/{VERSION}",
        "iu",
        NS,
        "uid-1",
    )
    assert (event.type, event.reason, event.message) == ("Warning", "ArchiveInvalid", "archive could not be unlocked")


def test_post_event_truncates_a_long_message(kube):
    kube.post_event(OBJ, "Warning", "LoadFailed", "x" * 5000)
    [(_, event)] = kube.core.events
    assert event.message == "x" * 1024


@pytest.mark.parametrize("error", [api_error(403), api_error(500), ProtocolError("aborted"), OSError("down")])
def test_post_event_never_raises(kube, error):
    kube.core.error = error
    assert kube.post_event(OBJ, "Normal", "Unlocked", "done") is None


def test_a_repeated_event_aggregates_into_the_one_already_posted(kube):
    """Issue 12: retries made one event object each; like client-go's recorder, a repeat
    bumps count and lastTimestamp of the event already posted."""
    for _ in range(3):
        kube.post_event(OBJ, "Warning", "ResourceApiUnavailable", "HTTP 503")
    [(_, event)] = kube.core.events
    assert event.count == 3 and event.last_timestamp
    kube.core.expired.add(event.metadata.name)
    kube.post_event(OBJ, "Warning", "ResourceApiUnavailable", "HTTP 503")
    assert len(kube.core.events) == 2 and kube.core.events[1][1].count == 1  # expired: posted anew
