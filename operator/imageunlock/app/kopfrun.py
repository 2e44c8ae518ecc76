"""How ``imageunlock agent`` and ``imageunlock controller`` run their kopf operators, with
settings from the environment.

* the **agent** (a DaemonSet: one per node) unlocks the images on its node and writes its
  node's entry of every selecting ImageUnlock's status (agent/handlers.py);
* the **controller** (the replica holding the Lease) writes each ImageUnlock's cluster summary: conditions,
  phase, NODES (controller/handlers.py).

What both roles share lives here; each role's module has its own ``run()``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import kopf

from imageunlock.app import logs
from imageunlock.app.config import AgentConfig, ControllerConfig
from imageunlock.errors import ConfigurationError

NO_NODE_NAME = "NODE_NAME is not set: an agent serves one node (the DaemonSet sets it from spec.nodeName)"

Config = TypeVar("Config", AgentConfig, ControllerConfig)


def read_config(load: Callable[[], Config]) -> Config | None:
    """A role's settings from the environment; a bad one: one line on stderr, and None."""
    try:
        config = load()
        if isinstance(config, AgentConfig) and not config.node_name:
            raise ConfigurationError(NO_NODE_NAME)
    except ConfigurationError as exc:
        print(f"imageunlock: error: {exc.message}", file=sys.stderr)
        return None
    return config


def serve(config: AgentConfig | ControllerConfig, registry: kopf.OperatorRegistry) -> int:
    """Run a role's kopf registry with its settings, logging configured first."""
    logs.configure(config.log_level, config.log_format, getattr(config, "node_name", None))
    _run(registry, config.namespaces, config.liveness_endpoint)
    return 0


def new_registry() -> kopf.OperatorRegistry:
    """A role's own handler registry, with kopf's login from the kubeconfig or the pod's
    ServiceAccount (a registry of our own does not carry kopf's default login handler)."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    return registry


def tune(settings: kopf.OperatorSettings) -> None:
    """kopf settings both roles share. Events are ours alone: kopf would post a second one
    per failure (type Error, reason Logging) from its handler-failure log lines."""
    settings.posting.enabled = False
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10


def _run(registry: kopf.OperatorRegistry, namespaces: tuple[str, ...], liveness: str) -> None:
    kopf.run(
        registry=registry,
        # No kopf peering: agents keep no kopf state in objects (every agent watches every
        # ImageUnlock and writes only its own entry), and the controller's replicas elect
        # their writer with a Lease (kube/lease.py): kopf peering pauses every same-priority
        # peer, which is no leader election.
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness or None,
    )
