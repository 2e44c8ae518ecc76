"""Container runtimes, one module each, all implementing :class:`imageunlock.engine.models.Runtime`.

The unlock service only knows that Protocol; choosing and building a runtime happens at the
edges (the CLI, the operator's startup) through :func:`make_runtime`. A new runtime is a new
module here and a new name in :data:`RUNTIMES`.
"""

from __future__ import annotations

from imageunlock.engine.models import Runtime
from imageunlock.errors import ConfigurationError

RUNTIMES = ("docker", "containerd")


def make_runtime(
    name: str,
    *,
    docker_host: str | None = None,
    containerd_address: str | None = None,
    containerd_namespace: str | None = None,
    timeout: float | None = None,
) -> Runtime:
    """The runtime called ``name``; each module is imported only when chosen (the docker SDK
    is not needed to load into containerd). ``None`` means that runtime's own default."""
    if name == "docker":
        from imageunlock.engine.runtimes import docker

        return docker.DockerRuntime(base_url=docker_host, timeout=timeout or docker.DEFAULT_TIMEOUT)
    if name == "containerd":
        from imageunlock.engine.runtimes import containerd

        return containerd.ContainerdRuntime(
            containerd_address or containerd.DEFAULT_ADDRESS,
            containerd_namespace or containerd.DEFAULT_NAMESPACE,
            timeout or containerd.DEFAULT_TIMEOUT,
        )
    raise ConfigurationError(f"unknown container runtime {name!r} (one of {', '.join(RUNTIMES)})")
