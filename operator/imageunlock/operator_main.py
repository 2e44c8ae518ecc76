"""``imageunlock agent`` and ``imageunlock controller``: run one role's kopf operator with
settings from the environment.

* the **agent** (a DaemonSet: one per node) unlocks the images on its node and writes its
  node's entry of every selecting ImageUnlock's status (handlers.py);
* the **controller** (one replica) writes each ImageUnlock's cluster summary: conditions,
  phase, NODES (controller.py).
"""

from __future__ import annotations

import logging
import sys

import kopf

from .config import ControllerConfig, OperatorConfig
from .errors import ConfigurationError

NO_NODE_NAME = "NODE_NAME is not set: an agent serves one node (the DaemonSet sets it from spec.nodeName)"


def run_agent() -> int:
    return _start("agent")


def run_controller() -> int:
    return _start("controller")


def _start(role: str) -> int:
    """Read the role's settings (a bad one: one line, exit 1), then run its kopf registry."""
    try:
        config: OperatorConfig | ControllerConfig
        if role == "agent":
            config = OperatorConfig.from_env()
            if not config.node_name:
                raise ConfigurationError(NO_NODE_NAME)
        else:
            config = ControllerConfig.from_env()
    except ConfigurationError as exc:
        print(f"imageunlock: error: {exc.message}", file=sys.stderr)
        return 1
    configure_logging(config.log_level, config.log_format)
    if role == "agent":
        from .handlers import registry
    else:
        from .controller import registry
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
        # ImageUnlock and writes only its own entry), and the controller is one replica
        # (Deployment strategy Recreate).
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness or None,
    )


def configure_logging(level: str, log_format: str) -> None:
    """One handler (kopf's): every line once, with time and level (``text``) or as JSON
    objects for log pipelines (``json``, kopf's own format)."""
    root = logging.getLogger()
    for handler in list(root.handlers):  # e.g. the CLI's default one: it would print every line twice
        root.removeHandler(handler)
    kopf.configure(
        debug=level == "debug",
        verbose=level == "debug",
        quiet=level == "warning",
        log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL,
        log_prefix=False,
    )
    # urllib3 and the docker SDK are chatty at debug level and add nothing we need. The
    # kubernetes client's loggers ("kubernetes", and its package logger "client") stay at
    # WARNING whatever our level: some versions log response bodies at DEBUG, and one of
    # the responses we read is a Secret.
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.INFO if level == "debug" else logging.WARNING)
    for kube_logger in ("kubernetes", "client"):
        logging.getLogger(kube_logger).setLevel(logging.WARNING)
