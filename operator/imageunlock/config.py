"""The operator's configuration, read once from the environment (the Deployment / Helm values
set it). Not to be confused with kopf's own ``settings`` or the resource API client's
:class:`~imageunlock.resource_api.ApiClientConfig`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .apiurl import parse_api_url
from .errors import ConfigurationError


@dataclass(frozen=True)
class OperatorConfig:
    archive_roots: tuple[str, ...] = ("/var/lib/imageunlock",)
    docker_host: str = "unix:///var/run/docker.sock"
    default_api_url: str | None = None
    # Resource APIs the credentials may be sent to: IMAGEUNLOCK_API_URL_ALLOWLIST plus RESOURCE_API_URL.
    api_url_allowlist: tuple[str, ...] = ()
    verify_interval: float = 300.0
    progress_interval: float = 2.0
    retry_base: float = 5.0
    retry_max: float = 300.0
    api_connect_timeout: float = 5.0
    api_read_timeout: float = 30.0
    api_retries: int = 3
    api_deadline: float = 60.0  # one whole resource API call: connect, answer and retries
    runtime_timeout: float = 900.0
    liveness_endpoint: str = "http://0.0.0.0:8080/healthz"
    namespaces: tuple[str, ...] = ()  # empty: every namespace
    workers: int = 4

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        problems: list[str] = []

        def number(name: str, default: float, minimum: float = 0.0) -> float:
            raw = env.get(name)
            if raw in (None, ""):
                return default
            try:
                value = float(raw)
            except ValueError:
                problems.append(f"{name}={raw!r} is not a number")
                return default
            if value < minimum:
                problems.append(f"{name}={raw!r} must be at least {minimum}")
            return value

        roots = tuple(r for r in env.get("IMAGEUNLOCK_ARCHIVE_ROOT", cls.archive_roots[0]).split(":") if r)
        for root in roots:
            if not root.startswith("/"):
                problems.append(f"IMAGEUNLOCK_ARCHIVE_ROOT entry {root!r} must be an absolute path")
        if not roots:
            problems.append("IMAGEUNLOCK_ARCHIVE_ROOT must name at least one directory")
        default_api_url = env.get("RESOURCE_API_URL") or None
        allowlist: tuple[str, ...] = ()
        named = [
            ("IMAGEUNLOCK_API_URL_ALLOWLIST entry", u.strip())
            for u in env.get("IMAGEUNLOCK_API_URL_ALLOWLIST", "").split(",")
            if u.strip()
        ]
        named += [("RESOURCE_API_URL", default_api_url)] if default_api_url else []
        for what, raw in named:
            try:
                canonical = parse_api_url(raw, what).url
            except ConfigurationError as exc:
                problems.append(exc.message)
                continue
            if what == "RESOURCE_API_URL":
                default_api_url = canonical  # the operator's own default is always trusted
            if canonical not in allowlist:
                allowlist += (canonical,)
        if not named:
            problems.append(
                "set RESOURCE_API_URL or IMAGEUNLOCK_API_URL_ALLOWLIST: the operator sends "
                "credentials only to resource APIs it was told to trust"
            )
        settings = cls(
            archive_roots=roots,
            docker_host=env.get("IMAGEUNLOCK_DOCKER_HOST") or env.get("DOCKER_HOST") or cls.docker_host,
            default_api_url=default_api_url,
            api_url_allowlist=allowlist,
            verify_interval=number("IMAGEUNLOCK_VERIFY_INTERVAL", cls.verify_interval, 1),
            progress_interval=number("IMAGEUNLOCK_PROGRESS_INTERVAL", cls.progress_interval, 0),
            retry_base=number("IMAGEUNLOCK_RETRY_BASE", cls.retry_base, 0.1),
            retry_max=number("IMAGEUNLOCK_RETRY_MAX", cls.retry_max, 1),
            api_connect_timeout=number("IMAGEUNLOCK_API_CONNECT_TIMEOUT", cls.api_connect_timeout, 0.1),
            api_read_timeout=number("IMAGEUNLOCK_API_READ_TIMEOUT", cls.api_read_timeout, 0.1),
            api_retries=int(number("IMAGEUNLOCK_API_RETRIES", cls.api_retries, 0)),
            api_deadline=number("IMAGEUNLOCK_API_DEADLINE", cls.api_deadline, 1),
            runtime_timeout=number("IMAGEUNLOCK_RUNTIME_TIMEOUT", cls.runtime_timeout, 1),
            liveness_endpoint=env.get("IMAGEUNLOCK_LIVENESS", cls.liveness_endpoint),
            namespaces=tuple(n for n in env.get("IMAGEUNLOCK_NAMESPACES", "").split(",") if n),
            workers=int(number("IMAGEUNLOCK_WORKERS", cls.workers, 1)),
        )
        if problems:
            raise ConfigurationError("invalid operator settings: " + "; ".join(problems))
        return settings
