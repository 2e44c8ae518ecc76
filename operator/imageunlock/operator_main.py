"""``imageunlock operator``: run the kopf operator with settings from the environment."""

from __future__ import annotations

import logging
import os
import sys

import kopf

from .config import OperatorConfig
from .errors import ConfigurationError


def run_operator() -> int:
    try:
        settings = OperatorConfig.from_env()
    except ConfigurationError as exc:
        print(f"imageunlock: error: {exc.message}", file=sys.stderr)
        return 1
    level = os.environ.get("IMAGEUNLOCK_LOG_LEVEL", "info").lower()
    if level not in ("debug", "info", "warning"):
        print(f"imageunlock: error: IMAGEUNLOCK_LOG_LEVEL={level!r} must be debug, info or warning", file=sys.stderr)
        return 1
    kopf.configure(
        debug=level == "debug", verbose=level == "debug", quiet=level == "warning", log_format=kopf.LogFormat.PLAIN
    )
    # urllib3 and the docker SDK are chatty at debug level and add nothing we need. The
    # kubernetes client's loggers ("kubernetes", and its package logger "client") stay at
    # WARNING whatever our level: some versions log response bodies at DEBUG, and one of
    # the responses we read is a Secret.
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.INFO if level == "debug" else logging.WARNING)
    for kube_logger in ("kubernetes", "client"):
        logging.getLogger(kube_logger).setLevel(logging.WARNING)

    from . import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,  # one replica (Deployment strategy Recreate): no peering objects
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=settings.liveness_endpoint or None,
    )
    return 0
