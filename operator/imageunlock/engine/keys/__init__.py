"""The key-source registry: where an unlock's AES key may come from.

The port is :class:`imageunlock.engine.models.KeySource`; the service knows nothing else. A
spec names its key source under ``spec.keySource``, a union of exactly one member (the
top-level ``spec.resourceApi`` is the same as ``spec.keySource.resourceApi``). Each member is
one :class:`KeySourceKind`: its member name, how its settings are parsed (pure, every problem
reported with its field path) and its adapter module, imported only when a key source is
built. The agent and the CLI build one with :func:`build_key_source`.

A new key source: an adapter module here with a ``build(spec, settings, credentials) ->
KeySource`` function, one ``register(KeySourceKind(...))`` below, and its member under
``spec.keySource`` in the CRD and in kube/models.py's ``KeySource`` (held equal by a test)
(docs/architecture.md; tests/support/fake_key_source.py is the recipe, run by a unit test).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from imageunlock.engine.keys.apiurl import parse_api_url, url_allowed
from imageunlock.engine.models import Credentials, KeySource
from imageunlock.errors import ConfigurationError

# How a key sealed to the TPM reaches the TPM when nothing else is said (tpm.py, sealed.py, the CLI).
DEFAULT_TCTI = "device:/dev/tpmrm0"


SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


@dataclass(frozen=True)
class ApiClientConfig:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 3
    backoff_factor: float = 0.5
    backoff_max: float = 10.0
    deadline: float = 60.0  # seconds for one whole call (login or key fetch), retries included
    max_retry_after: float = 10.0  # a server's Retry-After is obeyed up to this many seconds

    def __post_init__(self) -> None:
        if not (0 < self.deadline < math.inf and 0 <= self.max_retry_after < math.inf):
            raise ConfigurationError("resource API deadline must be > 0 and max Retry-After >= 0 (finite) seconds")


@dataclass(frozen=True)
class KeySettings:
    """What the agent (or the CLI) tells every key source."""

    default_api_url: str | None = None
    # Resource APIs the credentials may be sent to; empty: any (only the CLI, run by the
    # archive's owner: the agent always has a list).
    allowed_api_urls: tuple[str, ...] = ()
    api: ApiClientConfig = field(default_factory=ApiClientConfig)


@dataclass(frozen=True)
class KeySourceSpec:
    """A parsed member of ``spec.keySource``."""

    member: str
    secret_name: str | None = None  # the Secret (of the ImageUnlock's namespace) it reads, if any


@dataclass(frozen=True)
class ResourceApiSpec(KeySourceSpec):
    url: str = ""  # canonical: requests are only ever built from it


Parse = Callable[[Mapping[str, object], str, KeySettings, list[str]], KeySourceSpec]
# Reads a Secret of the ImageUnlock's namespace by name (the CLI: its environment).
ReadCredentials = Callable[[str], Credentials]


@dataclass(frozen=True)
class KeySourceKind:
    member: str  # its name under spec.keySource
    parse: Parse  # (raw member, its field path, settings, problems to append to) -> spec
    adapter: str  # the module with build(spec, settings, credentials: ReadCredentials) -> KeySource


_KINDS: dict[str, KeySourceKind] = {}


def register(kind: KeySourceKind) -> KeySourceKind:
    if not re.fullmatch(r"[a-z][A-Za-z0-9]*", kind.member):
        raise ConfigurationError(f"key source member {kind.member!r} is not usable")
    _KINDS[kind.member] = kind
    return kind


def members() -> tuple[str, ...]:
    return tuple(_KINDS)


def key_source_kind(member: str) -> KeySourceKind | None:
    return _KINDS.get(member)


def build_key_source(spec: KeySourceSpec, settings: KeySettings, credentials: ReadCredentials) -> KeySource:
    """The key source ``spec`` names; its adapter module is imported only now."""
    build = importlib.import_module(_KINDS[spec.member].adapter).build
    source: KeySource = build(spec, settings, credentials)
    return source


def secret_ref(raw: Mapping[str, object], where: str, problems: list[str]) -> str:
    """``credentialsSecretRef.name`` of a member: a Secret of the ImageUnlock's own namespace."""
    ref = raw.get("credentialsSecretRef") or {}
    name = ref.get("name") if isinstance(ref, Mapping) else None
    if not isinstance(name, str) or not name:
        problems.append(f"{where}.credentialsSecretRef.name is required")
        return ""
    if not re.fullmatch(SECRET_NAME_PATTERN, name):
        problems.append(f"{where}.credentialsSecretRef.name {name!r} is invalid (a Secret name in the same namespace)")
    return name


def _parse_resource_api(
    raw: Mapping[str, object], where: str, settings: KeySettings, problems: list[str]
) -> KeySourceSpec:
    url = raw.get("url") or settings.default_api_url
    if not url:
        problems.append(f"{where}.url is required (the operator has no RESOURCE_API_URL default)")
    else:
        try:
            url = parse_api_url(url, f"{where}.url").url  # requests are only ever built from the canonical form
        except ConfigurationError as exc:
            problems.append(exc.message)
        else:
            if settings.allowed_api_urls and not url_allowed(url, settings.allowed_api_urls):
                problems.append(
                    f"{where}.url {url!r} is not an allowed resource API "
                    f"({', '.join(settings.allowed_api_urls)}; operator setting IMAGEUNLOCK_API_URL_ALLOWLIST): "
                    "the credentials are only ever sent to allowed APIs"
                )
    return ResourceApiSpec("resourceApi", secret_ref(raw, where, problems), url=str(url or ""))


RESOURCE_API = register(
    KeySourceKind("resourceApi", parse=_parse_resource_api, adapter="imageunlock.engine.keys.resource_api")
)
