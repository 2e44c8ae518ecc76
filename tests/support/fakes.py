"""In-memory stand-ins for the three outside systems the unlock service and the reconciler
talk to: a container runtime, the resource API's key client and the Kubernetes API.

Each fake behaves like the real part where the code under test relies on it, and records
what was done to it so a test can assert on the effect:

* :class:`FakeRuntime` implements :class:`imageunlock.engine.models.Runtime`. ``load`` consumes the
  chunk iterator to the end before it stores anything — so the service's in-stream archive
  verification runs and, when it raises, nothing is loaded (the Engine's all-or-nothing) —
  and reads the image IDs from the archive with :mod:`tarfile` (an independent reader);
* :class:`FakeKeyClient` implements :class:`imageunlock.engine.keys.resource_api.KeyClient`, with
  scripted errors and call counts; :meth:`~FakeKeyClient.source` is the resource API key source
  (the real one) talking to it;
* :class:`FakeKubernetesApi` has the methods the reconciler uses from
  :class:`imageunlock.kube.client.KubernetesApi`; every status write is recorded and applied to a
  stored status as the API server does: a merge patch (RFC 7386) or one node's server-side apply,
  then pruned by the CRD's schema (a field the CRD does not declare is dropped).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from imageunlock.engine.keys import ApiClientConfig
from imageunlock.engine.keys.resource_api import ResourceApiKeySource
from imageunlock.engine.models import Credentials, OwnershipRecord
from imageunlock.engine.refs import normalize_ref
from imageunlock.errors import ConfigurationError, RuntimeUnavailableError

from .crd import prune_status
from .savetar import config_ids

ObjectKey = tuple[str, str]  # (namespace, name)


class FakeRuntime:
    """An image store: ``{ref: image ID}``, looked up the way Docker compares refs.

    Switches: ``unreachable`` (every call raises RuntimeUnavailableError), ``load_error`` (an
    exception ``load`` raises instead of loading), ``drop_after_load`` (refs that vanish right
    after a load), ``alter_after_load`` (``{ref: image ID}`` a load ends up with instead) and
    ``in_use`` (image IDs a container uses: :meth:`remove` keeps their refs). A load with an
    owner records it (:meth:`owned_refs`); ``pinned`` holds the refs not yet unpinned.
    """

    name = "fake"

    def __init__(self, images: Mapping[str, str] | None = None) -> None:
        self._images: dict[str, str] = {normalize_ref(ref): image_id for ref, image_id in (images or {}).items()}
        self.unreachable = False
        self.load_error: Exception | None = None
        self.drop_after_load: set[str] = set()
        self.alter_after_load: dict[str, str] = {}
        self.loads: list[dict[str, str]] = []  # per completed load: {tag: image ID}
        self.pings = 0
        self.owners: dict[str, tuple[str, str]] = {}  # ref -> (owner, image ID loaded)
        self.pinned: set[str] = set()
        self.in_use: set[str] = set()

    def add(self, images: Mapping[str, str]) -> None:
        """Images present before the test (``{ref: image ID}``), as if loaded earlier."""
        self._images.update({normalize_ref(ref): image_id for ref, image_id in images.items()})

    def _check(self) -> None:
        if self.unreachable:
            raise RuntimeUnavailableError("fake runtime is not reachable")

    def image_ids(self, refs: Sequence[str]) -> dict[str, str | None]:
        self._check()
        return {ref: self._images.get(normalize_ref(ref)) for ref in refs}

    def load(self, chunks: Iterable[bytes], refs: Sequence[str] = (), owner: str | None = None) -> list[str]:
        self._check()
        if self.load_error is not None:
            raise self.load_error
        archive = b"".join(chunks)  # an error raised by the stream propagates: nothing stored
        loaded = config_ids(archive)
        self.loads.append(loaded)
        for tag, image_id in loaded.items():
            self._images[normalize_ref(tag)] = image_id
        for ref in self.drop_after_load:
            self._images.pop(normalize_ref(ref), None)
        for ref, image_id in self.alter_after_load.items():
            self._images[normalize_ref(ref)] = image_id
        for tag, image_id in loaded.items():
            self.pinned.add(normalize_ref(tag))
            if owner is not None:
                self.owners[normalize_ref(tag)] = (owner, image_id)
        return list(loaded)

    def owned_refs(self) -> list[OwnershipRecord]:
        return [
            OwnershipRecord(ref, owner)
            for ref, (owner, image_id) in sorted(self.owners.items())
            if self._images.get(ref) == image_id
        ]

    def unpin(self, refs: Sequence[str]) -> list[str]:
        self._check()
        done = [ref for ref in refs if normalize_ref(ref) in self.pinned]
        self.pinned -= {normalize_ref(ref) for ref in done}
        return done

    def pin(self, refs: Sequence[str]) -> list[str]:
        self._check()
        done = [ref for ref in refs if normalize_ref(ref) in self._images and normalize_ref(ref) not in self.pinned]
        self.pinned |= {normalize_ref(ref) for ref in done}
        return done

    def remove(self, refs: Sequence[str]) -> tuple[list[str], list[str]]:
        self._check()
        removed, kept = [], []
        for ref in refs:
            if self._images.get(normalize_ref(ref)) in self.in_use:
                kept.append(ref)
            else:
                self._images.pop(normalize_ref(ref), None)
                self.pinned.discard(normalize_ref(ref))
                removed.append(ref)
        return removed, kept

    def ping(self) -> None:
        self.pings += 1
        self._check()

    def close(self) -> None:
        return None

    @property
    def images(self) -> dict[str, str]:
        """What the store holds now, by fully qualified ref."""
        return dict(self._images)


Script = Exception | Sequence[Exception | None] | None


class FakeKeyClient:
    """A resource API session that hands out ``fragment``.

    ``login_error`` / ``key_error``: an exception raised on every call, or a list scripting
    the calls in turn (``None`` for a call that succeeds; once the list is used up, calls
    succeed). ``opened`` records the credentials of every :meth:`open`.
    """

    def __init__(self, fragment: bytes, *, login_error: Script = None, key_error: Script = None) -> None:
        self.fragment = fragment
        self._login_errors = _script(login_error)
        self._key_errors = _script(key_error)
        self.opened: list[Credentials] = []
        self.urls: list[str] = []  # the resource API each session was opened for
        self.logins = 0
        self.fragments = 0
        self.closes = 0

    def open(self, credentials: Credentials) -> FakeKeyClient:
        """A session with these ``credentials`` (recorded)."""
        self.opened.append(credentials)
        return self

    def client(self, url: str, credentials: Credentials, _settings: ApiClientConfig) -> FakeKeyClient:
        """Stands in for ``ResourceApiClient(url, credentials, settings)``."""
        self.urls.append(url)
        return self.open(credentials)

    def source(self, credentials: Callable[[], Credentials], url: str = "https://api.test") -> ResourceApiKeySource:
        """The resource API key source (the real one), with this fake as its HTTP client."""
        return ResourceApiKeySource(url, credentials, client=self.client)

    def login(self) -> None:
        self.logins += 1
        if (error := _next(self._login_errors)) is not None:
            raise error

    def key_fragment(self) -> bytes:
        self.fragments += 1
        if (error := _next(self._key_errors)) is not None:
            raise error
        return self.fragment

    def close(self) -> None:
        self.closes += 1


def _script(script: Script) -> Exception | list[Exception | None] | None:
    return list(script) if isinstance(script, Sequence) else script


def _next(script: Exception | list[Exception | None] | None) -> Exception | None:
    if isinstance(script, list):
        return script.pop(0) if script else None
    return script


@dataclass(frozen=True)
class Event:
    object: ObjectKey
    type: str
    reason: str
    message: str


def merge_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch: ``null`` removes a key, objects merge, anything else replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        elif isinstance(value, Mapping):
            target[key] = merge_patch({}, value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeKubernetesApi:
    """Secrets, statuses and events of a pretend API server.

    ``secrets``: ``{(namespace, name): Credentials or an exception to raise}``; an absent
    Secret raises ConfigurationError, as :meth:`KubernetesApi.read_credentials` does on 404.
    ``statuses``: what each object's ``status`` has become after every patch so far (seed it
    with :meth:`seed` to start from an existing status).
    """

    def __init__(self) -> None:
        self.secrets: dict[ObjectKey, Credentials | Exception] = {}
        self.secret_versions: dict[ObjectKey, str] = {}
        self.statuses: dict[ObjectKey, dict[str, Any]] = {}
        self.writes: list[tuple[ObjectKey, dict[str, Any]]] = []
        self.events: list[Event] = []
        self.credential_reads: list[ObjectKey] = []
        self.patch_error: Exception | None = None
        self.nodes: dict[str, dict[str, Any]] = {}  # Node objects by name
        self.entry_writes: list[tuple[ObjectKey, str, dict[str, Any] | None]] = []
        self.objects: list[dict[str, Any]] = []  # what list_unlocks answers
        self.list_error: Exception | None = None
        self.lists = 0  # list_unlocks calls

    def add_secret(self, namespace: str, name: str, value: Credentials | Exception, version: str = "1") -> None:
        self.secrets[(namespace, name)] = value
        self.secret_versions[(namespace, name)] = version

    def seed(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.statuses[(namespace, name)] = copy.deepcopy(dict(status))

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.statuses.get((namespace, name), {}))

    def read_credentials(self, namespace: str, name: str) -> Credentials:
        self.credential_reads.append((namespace, name))
        value = self.secrets.get((namespace, name))
        if value is None:
            raise ConfigurationError(f"Secret {namespace}/{name} (spec.resourceApi.credentialsSecretRef) not found")
        if isinstance(value, Exception):
            raise value
        return value

    def secret_version(self, namespace: str, name: str) -> str | None:
        return self.secret_versions.get((namespace, name))

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any], manager: str | None = None) -> None:
        if self.patch_error is not None:
            raise self.patch_error
        self.writes.append(((namespace, name), copy.deepcopy(dict(status))))
        key = (namespace, name)
        self.statuses[key] = prune_status(merge_patch(self.statuses.get(key, {}), status))

    def apply_node_entry(self, namespace: str, name: str, node: str, entry: Mapping[str, Any] | None) -> None:
        """Server-side apply of one node's entry: the list merges by name; None removes it."""
        if self.patch_error is not None:
            raise self.patch_error
        status = self.statuses.get((namespace, name), {})
        others = [e for e in status.get("nodes") or [] if e.get("name") != node]
        status["nodes"] = others + ([copy.deepcopy(dict(entry))] if entry else [])
        self.statuses[(namespace, name)] = prune_status(status)
        self.entry_writes.append(((namespace, name), node, copy.deepcopy(dict(entry)) if entry else None))

    def read_node(self, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.nodes.get(name))

    def list_unlocks(self, namespaces: Collection[str] = ()) -> list[dict[str, Any]]:
        self.lists += 1
        if self.list_error is not None:
            raise self.list_error
        return [dict(o) for o in self.objects]

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        self.events.append(Event((meta.get("namespace", ""), meta.get("name", "")), type_, reason, message))

    def close(self) -> None:
        return None


# -- the fakes held to their ports (checked by mypy, never run) -------------------------------
# A fake that drifts from what it stands in for (a method renamed, a parameter added or
# retyped) fails `make lint` here instead of passing tests against a port that no longer exists.
if TYPE_CHECKING:
    from collections.abc import Callable

    from imageunlock.engine.keys.resource_api import KeyClient
    from imageunlock.engine.models import Runtime
    from imageunlock.kube.client import KubernetesApi

    class _KubernetesUsed(Protocol):
        """What the agent (reconciler, node view) and the controller call on
        :class:`~imageunlock.kube.client.KubernetesApi` and :class:`FakeKubernetesApi` stands
        in for; the real class is held to it too, so a change there fails here until both agree."""

        def read_credentials(self, namespace: str, name: str) -> Credentials: ...
        def secret_version(self, namespace: str, name: str) -> str | None: ...
        def patch_status(
            self, namespace: str, name: str, status: Mapping[str, Any], manager: str | None = None
        ) -> None: ...
        def apply_node_entry(self, namespace: str, name: str, node: str, entry: Mapping[str, Any] | None) -> None: ...
        def read_node(self, name: str) -> dict[str, Any] | None: ...
        def list_unlocks(self, namespaces: Collection[str] = ()) -> list[dict[str, Any]]: ...
        def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None: ...
        def close(self) -> None: ...

    _runtime: Runtime = FakeRuntime()
    _key_client: KeyClient = FakeKeyClient(b"")
    _open_key_client: Callable[[Credentials], KeyClient] = FakeKeyClient(b"").open  # UnlockService's factory
    _kubernetes: _KubernetesUsed = FakeKubernetesApi()
    _kubernetes_real: _KubernetesUsed = KubernetesApi()
