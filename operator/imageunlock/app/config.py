"""The operator's configuration, read once from the environment (the Deployment / Helm values
set it) by pydantic-settings: every variable typed and range-checked, and every problem
reported at once with the variable's name. Not to be confused with kopf's own ``settings``
or the resource API client's :class:`~imageunlock.engine.keys.resource_api.ApiClientConfig`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from imageunlock.engine import runtimes
from imageunlock.engine.keys.apiurl import parse_api_url
from imageunlock.errors import ConfigurationError

NO_TRUSTED_API = (
    "set RESOURCE_API_URL or IMAGEUNLOCK_API_URL_ALLOWLIST: the operator sends credentials only to "
    "resource APIs it was told to trust"
)
Seconds = Annotated[float, Field(allow_inf_nan=False)]
Listed = Annotated[tuple[str, ...], NoDecode]  # ":"- or ","-separated, not JSON


def _env(name: str, *more: str) -> Any:
    return AliasChoices(name, *more)


class _Settings(BaseSettings):
    """What every role reads: where it serves probes and metrics, what it watches, how it logs."""

    model_config = SettingsConfigDict(
        frozen=True,
        case_sensitive=True,
        env_ignore_empty=True,
        validate_by_name=True,
        validate_by_alias=True,
        extra="ignore",
    )

    liveness_endpoint: str = Field("http://0.0.0.0:8080/healthz", validation_alias=_env("IMAGEUNLOCK_LIVENESS"))
    # host:port of the Prometheus /metrics endpoint; empty disables it
    metrics_address: str = Field("0.0.0.0:8081", validation_alias=_env("IMAGEUNLOCK_METRICS_ADDRESS"))
    namespaces: Listed = Field((), validation_alias=_env("IMAGEUNLOCK_NAMESPACES"))  # empty: every namespace
    log_level: Literal["debug", "info", "warning"] = Field("info", validation_alias=_env("IMAGEUNLOCK_LOG_LEVEL"))
    log_format: Literal["text", "json"] = Field("text", validation_alias=_env("IMAGEUNLOCK_LOG_FORMAT"))

    @field_validator("namespaces", mode="before")
    @classmethod
    def _namespaces(cls, value: object) -> object:
        return _split_commas(value)

    # runtime: the agent's (check_fields=False: a field of a subclass, lower-cased the same way)
    @field_validator("log_level", "log_format", "runtime", mode="before", check_fields=False)
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("metrics_address")
    @classmethod
    def _address(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if value and not (sep and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError("must be host:port (e.g. 0.0.0.0:8081) or empty to disable")
        return value

    @classmethod
    def _derived(cls, env: Mapping[str, str]) -> dict[str, Any]:
        """Fields read from variables that no field names (a registry's)."""
        return {}

    @classmethod
    def _more_problems(cls, values: Mapping[str, str], problems: list[str]) -> list[str]:
        """Cross-field problems to report even when a field's error skipped the check."""
        return []

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """Read the configuration from ``env`` (default: the process environment); any problem
        is one ConfigurationError that names every offending variable."""
        env = os.environ if env is None else env
        names = {alias for field in cls.model_fields.values() for alias in _aliases(field.validation_alias)}
        # An empty variable means "not set", except where empty is a value of its own.
        keep_empty = {"IMAGEUNLOCK_LIVENESS", "IMAGEUNLOCK_METRICS_ADDRESS"}
        values: dict[str, Any] = {
            name: value for name, value in env.items() if name in names and (value != "" or name in keep_empty)
        }
        values.update(cls._derived(env))
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = [_describe(e, env) for e in exc.errors()]
            problems += cls._more_problems(values, problems)
            raise ConfigurationError(f"invalid {cls._what} settings: {'; '.join(problems)}") from None

    _what: ClassVar[str] = "operator"


def _split_commas(value: object) -> object:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value


class AgentConfig(_Settings):
    """The node agent's settings (one agent per node: the DaemonSet)."""

    _what: ClassVar[str] = "agent"
    # The node this agent runs on (the DaemonSet sets it from spec.nodeName).
    node_name: str | None = Field(None, validation_alias=_env("NODE_NAME", "IMAGEUNLOCK_NODE_NAME"))
    archive_roots: Listed = Field(("/var/lib/imageunlock",), validation_alias=_env("IMAGEUNLOCK_ARCHIVE_ROOT"))
    # Multi-tenant nodes: an ImageUnlock may name only files under <root>/<its namespace>/.
    archive_per_namespace: bool = Field(False, validation_alias=_env("IMAGEUNLOCK_ARCHIVE_PER_NAMESPACE"))
    # Multi-tenant nodes: which image names each namespace may unlock ({namespace: [prefix]},
    # JSON; a prefix ends in "/" or is one repository). Empty: any name (one tenant). Image
    # names are node-wide: without this, one tenant could take names another one uses.
    image_owners: Annotated[dict[str, tuple[str, ...]], NoDecode] = Field(
        default_factory=dict, validation_alias=_env("IMAGEUNLOCK_IMAGE_OWNERS")
    )
    # The runtime kubelet runs pods from on this node, and what spec.runtime "auto" means;
    # auto: the one the Node reports (status.nodeInfo.containerRuntimeVersion). A registered
    # runtime's name (engine.runtimes), as are the settings below: each runtime's own
    # variables (IMAGEUNLOCK_DOCKER_HOST, IMAGEUNLOCK_CONTAINERD_ADDRESS, ...), by key.
    runtime: str = Field(runtimes.AUTO, validation_alias=_env("IMAGEUNLOCK_RUNTIME"))
    runtime_settings: dict[str, str | None] = Field(default_factory=runtimes.default_settings)
    default_api_url: str | None = Field(None, validation_alias=_env("RESOURCE_API_URL"))
    # Resource APIs the credentials may be sent to: IMAGEUNLOCK_API_URL_ALLOWLIST plus RESOURCE_API_URL.
    api_url_allowlist: Listed = Field((), validation_alias=_env("IMAGEUNLOCK_API_URL_ALLOWLIST"))
    verify_interval: Seconds = Field(300.0, ge=1, validation_alias=_env("IMAGEUNLOCK_VERIFY_INTERVAL"))
    progress_interval: Seconds = Field(2.0, ge=0, validation_alias=_env("IMAGEUNLOCK_PROGRESS_INTERVAL"))
    retry_base: Seconds = Field(5.0, ge=0.1, validation_alias=_env("IMAGEUNLOCK_RETRY_BASE"))
    retry_max: Seconds = Field(300.0, ge=1, validation_alias=_env("IMAGEUNLOCK_RETRY_MAX"))
    api_connect_timeout: Seconds = Field(5.0, ge=0.1, validation_alias=_env("IMAGEUNLOCK_API_CONNECT_TIMEOUT"))
    api_read_timeout: Seconds = Field(30.0, ge=0.1, validation_alias=_env("IMAGEUNLOCK_API_READ_TIMEOUT"))
    api_retries: int = Field(3, ge=0, validation_alias=_env("IMAGEUNLOCK_API_RETRIES"))
    # one whole resource API call: connect, answer and retries
    api_deadline: Seconds = Field(60.0, ge=1, validation_alias=_env("IMAGEUNLOCK_API_DEADLINE"))
    runtime_timeout: Seconds = Field(900.0, ge=1, validation_alias=_env("IMAGEUNLOCK_RUNTIME_TIMEOUT"))
    workers: int = Field(4, ge=1, validation_alias=_env("IMAGEUNLOCK_WORKERS"))
    # How an ImageUnlock with keySealing TPM reaches this node's TPM (a TPM software stack
    # TCTI string; the chart mounts /dev/tpmrm0 with agent.tpm.enabled).
    tpm_tcti: str = Field("device:/dev/tpmrm0", min_length=1, validation_alias=_env("IMAGEUNLOCK_TPM_TCTI"))

    @field_validator("image_owners", mode="before")
    @classmethod
    def _owners(cls, value: object) -> object:
        """JSON, as the chart renders it (toJson): {"team-a": ["azaion/", "registry.corp/a/"]}."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"is not JSON ({exc})") from None
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(isinstance(p, str) and p for p in v)
            for k, v in value.items()
        ):
            raise ValueError('must map namespaces to lists of image name prefixes: {"team-a": ["azaion/"]}')
        return value

    def roots_for(self, namespace: str) -> tuple[str, ...]:
        """The archive roots an ImageUnlock in ``namespace`` may name files under."""
        if not self.archive_per_namespace:
            return tuple(self.archive_roots)
        if not namespace or "/" in namespace or namespace in (".", ".."):
            return ()
        return tuple(f"{root.rstrip('/')}/{namespace}" for root in self.archive_roots)

    @field_validator("archive_roots", mode="before")
    @classmethod
    def _roots(cls, value: object) -> object:
        roots = tuple(r for r in value.split(":") if r) if isinstance(value, str) else value
        if isinstance(roots, tuple):
            if not roots:
                raise ValueError("must name at least one directory")
            if bad := [r for r in roots if not r.startswith("/")]:
                raise ValueError(f"entries must be absolute paths: {', '.join(bad)}")
        return roots

    @field_validator("api_url_allowlist", mode="before")
    @classmethod
    def _commas(cls, value: object) -> object:
        return _split_commas(value)

    @classmethod
    def _derived(cls, env: Mapping[str, str]) -> dict[str, Any]:
        """Each registered runtime's settings: the first of its variables that is set."""
        settings = {
            s.key: next((env[name] for name in s.env if env.get(name)), s.default)
            for kind in runtimes.kinds()
            for s in kind.settings
        }
        return {"runtime_settings": settings}

    @field_validator("runtime")
    @classmethod
    def _runtime_known(cls, value: str) -> str:
        if value not in (known := (*runtimes.names(), runtimes.AUTO)):
            raise ValueError(f"must be one of {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _trusted_apis(self) -> AgentConfig:
        """Canonical URLs only, and at least one: the credentials go nowhere else."""
        named = [("IMAGEUNLOCK_API_URL_ALLOWLIST entry", u) for u in self.api_url_allowlist]
        named += [("RESOURCE_API_URL", self.default_api_url)] if self.default_api_url else []
        allowlist: tuple[str, ...] = ()
        problems = []
        for what, raw in named:
            try:
                canonical = parse_api_url(raw, what).url
            except ConfigurationError as exc:
                problems.append(exc.message)
                continue
            if what == "RESOURCE_API_URL":
                object.__setattr__(self, "default_api_url", canonical)  # the operator's own default is trusted
            if canonical not in allowlist:
                allowlist += (canonical,)
        if not named:
            problems.append(NO_TRUSTED_API)
        if problems:
            raise ValueError("; ".join(problems))
        object.__setattr__(self, "api_url_allowlist", allowlist)
        return self

    @classmethod
    def _more_problems(cls, values: Mapping[str, str], problems: list[str]) -> list[str]:
        if values.get("RESOURCE_API_URL") or values.get("IMAGEUNLOCK_API_URL_ALLOWLIST"):
            return []
        return [] if any(NO_TRUSTED_API in p for p in problems) else [NO_TRUSTED_API]


class ControllerConfig(_Settings):
    """The controller's settings: the replica holding the Lease computes every ImageUnlock's
    cluster summary. It must know where the agent DaemonSet runs (the chart passes the
    DaemonSet's nodeSelector and tolerations) to tell which nodes an ImageUnlock waits for."""

    _what: ClassVar[str] = "controller"
    agent_node_selector: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, validation_alias=_env("IMAGEUNLOCK_AGENT_NODE_SELECTOR")
    )
    agent_tolerations: Annotated[tuple[dict[str, Any], ...], NoDecode] = Field(
        (), validation_alias=_env("IMAGEUNLOCK_AGENT_TOLERATIONS")
    )
    # Leader election (kube/lease.py): only the holder of this Lease writes summaries. Off:
    # every replica writes (run exactly one). The namespace is the pod's (downward API), else
    # the ServiceAccount's, else "default" (a controller run outside the cluster).
    leader_election: bool = Field(True, validation_alias=_env("IMAGEUNLOCK_LEADER_ELECTION"))
    lease_name: str = Field("imageunlock-controller", min_length=1, validation_alias=_env("IMAGEUNLOCK_LEASE_NAME"))
    lease_namespace: str = Field("", validation_alias=_env("IMAGEUNLOCK_LEASE_NAMESPACE", "POD_NAMESPACE"))
    lease_duration: Seconds = Field(10.0, ge=1, validation_alias=_env("IMAGEUNLOCK_LEASE_DURATION"))
    renew_deadline: Seconds = Field(7.0, gt=0, validation_alias=_env("IMAGEUNLOCK_LEASE_RENEW_DEADLINE"))
    retry_period: Seconds = Field(2.0, gt=0, validation_alias=_env("IMAGEUNLOCK_LEASE_RETRY_PERIOD"))

    @model_validator(mode="after")
    def _lease_timing(self) -> ControllerConfig:
        if not self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "IMAGEUNLOCK_LEASE_RETRY_PERIOD < IMAGEUNLOCK_LEASE_RENEW_DEADLINE < IMAGEUNLOCK_LEASE_DURATION "
                "is needed: the leader must stop before its Lease may be taken over"
            )
        return self

    @field_validator("agent_node_selector", "agent_tolerations", mode="before")
    @classmethod
    def _json(cls, value: object) -> object:
        """JSON, as the chart renders it (toJson)."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"is not JSON ({exc})") from None
        return value


def _aliases(alias: object) -> list[str]:
    return [a for a in alias.choices if isinstance(a, str)] if isinstance(alias, AliasChoices) else []


_URL_VARIABLES = {"RESOURCE_API_URL", "IMAGEUNLOCK_API_URL_ALLOWLIST"}


def _describe(error: Any, env: Mapping[str, str]) -> str:
    name = str(error["loc"][0]) if error["loc"] else ""
    message = str(error["msg"]).removeprefix("Value error, ")
    if name in env and name not in _URL_VARIABLES:  # URL messages show the URL, user info masked
        return f"{name}={env[name]!r}: {message}"
    return message
