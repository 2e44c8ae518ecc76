"""``imageunlock operator``: run the kopf operator with settings from the environment."""

from __future__ import annotations

import logging
import sys

import kopf

from .config import OperatorConfig
from .errors import ConfigurationError


def run_operator() -> int:
    try:
        config = OperatorConfig.from_env()
    except ConfigurationError as exc:
        print(f"imageunlock: error: {exc.message}", file=sys.stderr)
        return 1
    configure_logging(config.log_level, config.log_format)

    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,  # one replica (Deployment strategy Recreate): no peering objects
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=config.liveness_endpoint or None,
    )
    return 0


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
