"""Adapter: the Kubernetes API where kopf does not cover it.

Reading the credentials Secret, and writing status and events from worker threads while an
unlock is under way (kopf only patches when a handler returns). Blocking calls: used from
threads only. No Secret value ever leaves ``read_credentials`` except inside
:class:`Credentials`, whose ``repr`` hides the password; no API error body is echoed.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import logging
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, overload

import kubernetes
import kubernetes.watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from imageunlock.engine.models import Credentials
from imageunlock.errors import ConfigurationError, KubernetesUnavailableError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "loader.azaion.com", "v1alpha1", "imageunlocks", "ImageUnlock"
MAX_EMAIL_BYTES = 1024
MAX_PASSWORD_BYTES = 4096
COMPONENT = "imageunlock-operator"
MAX_REMEMBERED_EVENTS = 4096
WATCH_SECONDS = 300  # the server ends a watch after this; it is resumed from the last version
# Secrets are only ever listed and watched as metadata (PartialObjectMetadata): the API server
# leaves out their data, so a watch never brings a password into this process.
_METADATA_LIST = {"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"}
_METADATA = {"Accept": "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"}
FORBIDDEN_RETRY = 300.0  # seconds before a watch RBAC refused is tried again (a binding may follow)
# A Secret watch is short: an agent follows many (one per Secret it waits for) and a stopped
# one must not linger (its response is also cut when its StopEvent is set).
SECRET_WATCH_SECONDS = 60


class StopEvent(threading.Event):
    """A stop flag that also runs hooks when set: a watch registers one that cuts its blocked
    response, so the watch thread ends now, not when the server ends the watch."""

    def __init__(self) -> None:
        super().__init__()
        self._hooks: list[Callable[[], None]] = []
        self._hooks_lock = threading.Lock()

    def on_set(self, hook: Callable[[], None]) -> Callable[[], None]:
        """Run ``hook`` when this is set (now, if it already is); returns its remover."""
        with self._hooks_lock:
            self._hooks.append(hook)
        if self.is_set():
            _quietly(hook)

        def remove() -> None:
            with self._hooks_lock:
                if hook in self._hooks:
                    self._hooks.remove(hook)

        return remove

    def set(self) -> None:
        super().set()
        with self._hooks_lock:
            hooks = list(self._hooks)
        for hook in hooks:
            _quietly(hook)


def _quietly(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:  # a socket already closed, say: the watch ends either way
        log.debug("a stop hook failed", exc_info=True)


def _cut(responses: list[Any]) -> None:
    """Unblock a watch's read from another thread (urllib3's HTTPResponse.shutdown)."""
    for response in list(responses):
        shutdown = getattr(response, "shutdown", None) or getattr(response, "close", None)
        if shutdown is not None:
            shutdown()


T = TypeVar("T")


@dataclass(frozen=True)
class Refused:
    """An answer of the API server that a caller expects and handles (404, 403, …)."""

    status: int


@overload
def _call(what: str, call: Callable[[], T]) -> T: ...
@overload
def _call(what: str, call: Callable[[], T], expected: Collection[int]) -> T | Refused: ...
def _call(what: str, call: Callable[[], T], expected: Collection[int] = ()) -> T | Refused:
    """The one translation of the client's errors: an answer whose HTTP status is in
    ``expected`` comes back as :class:`Refused`; any other failure is a transient
    KubernetesUnavailableError naming ``what`` and the status or the error's type, never
    the response body (it may hold a Secret)."""
    try:
        return call()
    except ApiException as exc:
        if exc.status in expected:
            return Refused(int(exc.status))
        raise KubernetesUnavailableError(f"{what} failed (HTTP {exc.status})") from None
    except (HTTPError, OSError) as exc:
        raise KubernetesUnavailableError(f"{what} failed ({type(exc).__name__})") from None


def _client() -> kubernetes.client.ApiClient:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    return kubernetes.client.ApiClient()


class KubernetesApi:
    def __init__(self, api_client: kubernetes.client.ApiClient | None = None, instance: str = COMPONENT) -> None:
        self.api_client = api_client or _client()
        self.instance = instance  # the event source's host: an agent's node
        self.core = kubernetes.client.CoreV1Api(self.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)
        self._events: OrderedDict[tuple[Any, ...], tuple[str, int]] = OrderedDict()  # what post_event sent
        self._events_lock = threading.Lock()

    def close(self) -> None:
        self.api_client.close()

    def read_credentials(self, namespace: str, name: str) -> Credentials:
        where = f"Secret {namespace}/{name}"
        secret = _call(f"reading {where}", lambda: self.core.read_namespaced_secret(name, namespace), (403, 404))
        if secret == Refused(404):
            raise ConfigurationError(
                f"{where} (spec.resourceApi.credentialsSecretRef) not found; create it with keys email and password"
            )
        if isinstance(secret, Refused):
            raise ConfigurationError(f"the operator is not allowed to read {where} (RBAC)")
        data: dict[str, Any] = secret.data or {}
        missing = [key for key in ("email", "password") if not data.get(key)]
        if missing:
            raise ConfigurationError(f"{where} lacks key(s) {', '.join(missing)}; it needs email and password")
        email = _decode(where, "email", data["email"], MAX_EMAIL_BYTES)
        password = _decode(where, "password", data["password"], MAX_PASSWORD_BYTES)
        return Credentials(email=email, password=password)

    def secret_version(self, namespace: str, name: str) -> str | None:
        """The Secret's resourceVersion (None when absent or unreadable): tells whether the
        credentials changed without looking at them."""
        secret = _call(
            f"reading Secret {namespace}/{name}", lambda: self.core.read_namespaced_secret(name, namespace), (403, 404)
        )
        if isinstance(secret, Refused):
            return None
        return secret.metadata.resource_version if secret.metadata else None

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any], manager: str | None = None) -> None:
        extra: dict[str, Any] = {"field_manager": manager} if manager else {}
        self._write_status(
            "status", namespace, name, {"status": dict(status)}, _content_type="application/merge-patch+json", **extra
        )

    def apply_node_entry(self, namespace: str, name: str, node: str, entry: Mapping[str, Any] | None) -> None:
        """Write this node's entry in ``status.nodes`` (None: remove it) by server-side apply
        under the node's own field manager: the API server merges the list by ``name``, so
        concurrent agents never overwrite each other, and applying an empty list removes only
        the entry this manager owns."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "status": {"nodes": [dict(entry)] if entry else []},
        }
        self._write_status(
            f"node {node}'s status",
            namespace,
            name,
            body,
            field_manager=node_manager(node),
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    def _write_status(self, what: str, namespace: str, name: str, body: dict[str, Any], **options: Any) -> None:
        def patch() -> object:
            return self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, body, **options
            )

        if isinstance(_call(f"writing {what}", patch, (404,)), Refused):  # deleted meanwhile: nothing to report on
            log.info("ImageUnlock %s/%s is gone; %s not written", namespace, name, what)

    def read_node(self, name: str) -> dict[str, Any] | None:
        """The Node object (as JSON-style dicts), or None when there is no such Node."""
        node = _call(f"reading Node {name}", lambda: self.core.read_node(name), (404,))
        if isinstance(node, Refused):
            return None
        result: dict[str, Any] = self.api_client.sanitize_for_serialization(node)
        return result

    def follow_node(self, name: str, on_change: Callable[[dict[str, Any] | None], None], stop: threading.Event) -> None:
        """Follow one Node until ``stop`` is set: one list (a field selector on its name), then
        a watch from that list's resourceVersion, resumed from the last version seen when the
        server ends it; listed again only when the version has expired (410) or the watch
        failed. ``on_change`` gets the Node as JSON-style dicts, or None when there is none.
        An idle node costs no request but the open watch."""
        selector = f"metadata.name={name}"
        version: str | None = None
        delay = 1.0
        while not stop.is_set():
            try:
                if version is None:
                    listed = self.core.list_node(field_selector=selector)
                    items = [self.api_client.sanitize_for_serialization(n) for n in listed.items]
                    on_change(items[0] if items else None)
                    version = (listed.metadata.resource_version if listed.metadata else None) or "0"
                watch = kubernetes.watch.Watch()
                for event in watch.stream(
                    self.core.list_node,
                    field_selector=selector,
                    resource_version=version,
                    timeout_seconds=WATCH_SECONDS,
                    allow_watch_bookmarks=True,
                ):
                    if stop.is_set():
                        watch.stop()
                        break
                    raw = event.get("raw_object") or {}
                    if event.get("type") == "ERROR":
                        version = None  # e.g. 410 Gone: the version expired; list again
                        break
                    version = (raw.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        on_change(raw)
                    elif event.get("type") == "DELETED":
                        on_change(None)
                delay = 1.0
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                    continue
                log.info("watching Node %s failed (HTTP %s); again in %.0fs", name, exc.status, delay)
                stop.wait(delay)
                delay = min(delay * 2, 60.0)
            except (HTTPError, OSError, ValueError) as exc:
                log.info("watching Node %s failed (%s); again in %.0fs", name, type(exc).__name__, delay)
                stop.wait(delay)
                delay = min(delay * 2, 60.0)

    def patch_node_metadata(self, name: str, patch: Mapping[str, Any], manager: str | None = None) -> bool:
        """Merge-patch a Node's labels and annotations (the controller's readiness label);
        False when the Node is gone."""
        extra: dict[str, Any] = {"field_manager": manager} if manager else {}

        def patch_node() -> object:
            return self.core.patch_node(name, dict(patch), _content_type="application/merge-patch+json", **extra)

        return not isinstance(_call(f"labelling Node {name}", patch_node, (404,)), Refused)

    def list_unlocks(self, namespaces: Collection[str] = ()) -> list[dict[str, Any]]:
        """Every ImageUnlock (of ``namespaces``; none given: of all namespaces)."""

        def items(answer: object) -> list[dict[str, Any]]:
            return list(answer.get("items") or []) if isinstance(answer, dict) else []

        if not namespaces:
            return items(
                _call("listing ImageUnlocks", lambda: self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL))
            )
        found: list[dict[str, Any]] = []
        for namespace in namespaces:

            def listed(ns: str = namespace) -> object:
                return self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)

            found += items(_call(f"listing ImageUnlocks of {namespace}", listed))
        return found

    def follow_secret(
        self, namespace: str, name: str, on_change: Callable[[str | None], None], stop: threading.Event
    ) -> None:
        """Follow one Secret's resourceVersion until ``stop`` is set, as :meth:`follow_node`
        follows a Node: a list and a watch with the field selector ``metadata.name=<name>`` in
        its namespace, both metadata-only (PartialObjectMetadata: the API server sends no
        ``data``; but it does send the annotations, and a Secret made with ``kubectl apply``
        carries its data in ``kubectl.kubernetes.io/last-applied-configuration``: only the
        resourceVersion is read, the rest is discarded unlogged). ``on_change`` gets the
        resourceVersion, or None while there is no such Secret. The watch lasts
        SECRET_WATCH_SECONDS and is resumed; with a :class:`StopEvent` as ``stop``, setting it
        cuts the open response, so the thread ends at once. Refused by RBAC (the agents'
        Secret role bound without list/watch there), it logs one warning and tries again every
        FORBIDDEN_RETRY seconds; a fixed Secret is then noticed at the verify interval."""
        selector = f"metadata.name={name}"
        where = f"Secret {namespace}/{name}"
        responses: list[Any] = []  # the watch's open response, cut when stop is set
        lister = self.core.list_namespaced_secret

        @functools.wraps(lister)  # Watch.stream reads the docstring for the watch parameter
        def watched(*args: Any, **kwargs: Any) -> Any:
            if stop.is_set():
                raise ConnectionAbortedError("the watch was stopped")
            response = lister(*args, **kwargs)
            responses[:] = [response]
            if stop.is_set():
                _cut(responses)
            return response

        remove = stop.on_set(lambda: _cut(responses)) if isinstance(stop, StopEvent) else None
        try:
            self._follow_secret(namespace, selector, where, on_change, stop, watched)
        finally:
            if remove is not None:
                remove()

    def _follow_secret(
        self,
        namespace: str,
        selector: str,
        where: str,
        on_change: Callable[[str | None], None],
        stop: threading.Event,
        watched: Callable[..., Any],
    ) -> None:
        version: str | None = None
        delay, warned = 1.0, False
        while not stop.is_set():
            try:
                if version is None:
                    answer = self.core.list_namespaced_secret(
                        namespace, field_selector=selector, _headers=_METADATA_LIST, _preload_content=False
                    )
                    listed = json.loads(answer.data)  # type: ignore[attr-defined]  # the raw answer
                    items = listed.get("items") or []
                    on_change(((items[0].get("metadata") or {}).get("resourceVersion")) if items else None)
                    version = (listed.get("metadata") or {}).get("resourceVersion") or "0"
                watch = kubernetes.watch.Watch()
                for event in watch.stream(
                    watched,
                    namespace,
                    field_selector=selector,
                    resource_version=version,
                    timeout_seconds=SECRET_WATCH_SECONDS,
                    allow_watch_bookmarks=True,
                    _headers=_METADATA,
                    deserialize=False,
                ):
                    if stop.is_set():
                        watch.stop()
                        break
                    raw = event.get("raw_object") or event.get("object") or {}  # undecoded: a dict
                    if event.get("type") == "ERROR":
                        version = None  # e.g. 410 Gone: list again
                        break
                    version = (raw.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        on_change((raw.get("metadata") or {}).get("resourceVersion"))
                    elif event.get("type") == "DELETED":
                        on_change(None)
                delay, warned = 1.0, False
            except ApiException as exc:
                if exc.status == 410:
                    version = None
                    continue
                if exc.status == 403:
                    if not warned:
                        log.warning(
                            "not allowed to watch %s (RBAC: the agents' Secret role needs list and watch "
                            "there): a fixed Secret is re-checked at the verify interval, not at once",
                            where,
                        )
                        warned = True
                    stop.wait(FORBIDDEN_RETRY)
                    continue
                log.info("watching %s failed (HTTP %s); again in %.0fs", where, exc.status, delay)
                stop.wait(delay)
                delay = min(delay * 2, 60.0)
            except (HTTPError, OSError, ValueError, AttributeError) as exc:
                if stop.is_set():
                    return  # the response was cut on purpose
                log.info("watching %s failed (%s); again in %.0fs", where, type(exc).__name__, delay)
                stop.wait(delay)
                delay = min(delay * 2, 60.0)

    def list_nodes(self) -> list[dict[str, Any]]:
        nodes = _call("listing Nodes", self.core.list_node)
        return [self.api_client.sanitize_for_serialization(n) for n in nodes.items]

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Record an Event on an ImageUnlock, as client-go's recorder does: a repeat of the same
        event (object, type, reason, message) bumps ``count`` and ``lastTimestamp`` of the
        object already posted instead of making a new one, so retries make no storm. Failures
        are logged, never raised."""
        meta = obj.get("metadata", {})
        namespace, now, message = meta.get("namespace"), datetime.now(UTC), message[:1024]
        key = (meta.get("uid") or meta.get("name"), type_, reason, message)
        with self._events_lock:
            seen = self._events.get(key)
        try:
            if seen is not None:
                name, count = seen
                try:
                    self.core.patch_namespaced_event(
                        name,
                        namespace,
                        {"count": count + 1, "lastTimestamp": now.isoformat()},
                        _content_type="application/merge-patch+json",
                    )
                    self._remember(key, name, count + 1)
                    return
                except ApiException as exc:
                    if exc.status != 404:  # expired (events live an hour): post it anew
                        raise
            name = f"{meta.get('name')}.{secrets.token_hex(8)}"  # like kubectl's ("x." is no valid generateName)
            event = self._event(meta, name, type_, reason, message, now, self.instance)
            self.core.create_namespaced_event(namespace, event)
            self._remember(key, name, 1)
        except (ApiException, HTTPError, OSError) as exc:
            log.warning("could not post event %s on %s: %s", reason, meta.get("name"), type(exc).__name__)

    def _remember(self, key: tuple[Any, ...], name: str, count: int) -> None:
        with self._events_lock:
            self._events[key] = (name, count)
            self._events.move_to_end(key)
            while len(self._events) > MAX_REMEMBERED_EVENTS:
                self._events.popitem(last=False)

    @staticmethod
    def _event(
        meta: Mapping[str, Any], name: str, type_: str, reason: str, message: str, now: datetime, instance: str
    ) -> kubernetes.client.CoreV1Event:
        return kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(name=name, namespace=meta.get("namespace")),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind=KIND,
                name=meta.get("name"),
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message,
            type=type_,
            count=1,
            first_timestamp=now,
            last_timestamp=now,
            source=kubernetes.client.V1EventSource(component=COMPONENT, host=instance),
            reporting_component=COMPONENT,
            reporting_instance=instance,
        )


def node_manager(node: str) -> str:
    """The field manager of one node's agent (at most 128 characters, as the API requires)."""
    manager = f"imageunlock-agent/{node}"
    return manager if len(manager) <= 128 else f"imageunlock-agent/{hashlib.sha256(node.encode()).hexdigest()}"


def _decode(where: str, key: str, value: str, limit: int) -> str:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{where} key {key!r} is not valid base64") from None
    if len(raw) > limit:
        raise ConfigurationError(f"{where} key {key!r} is larger than {limit} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(f"{where} key {key!r} is not UTF-8 text") from None
    text = text.rstrip("\r\n")  # the usual artefact of `echo ... | base64`
    if not text:
        raise ConfigurationError(f"{where} key {key!r} is empty")
    return text
