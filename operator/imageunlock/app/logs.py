"""Logging for both roles: one handler, every line once, in the form an on-call engineer and a
log pipeline need.

* ``text``: ``2026-12-06T13:57:33.123Z WARNING imageunlock.agent.reconciler: message
  [ns/name node=edge-1 reason=AuthenticationFailed]`` (ISO-8601 UTC, the full logger name);
* ``json``: one object per line with ``timestamp``, ``severity``, ``logger``, ``message`` and,
  where they apply, ``node``, ``namespace``, ``name``, ``reason`` (and ``exception``).

A line about one ImageUnlock passes its fields with ``extra=fields(namespace, name, reason)``;
kopf's own per-object lines carry them the same way (``k8s_ref``), and an agent's lines all
carry its node. Successes of kopf's handlers are not logged at the default level (kopf logs one
per watch event); state changes are, by the code that makes them (README, "Logs").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

FIELDS = ("node", "reason")


def fields(namespace: str, name: str, reason: str | None = None) -> dict[str, Any]:
    """The ``extra`` of a log line about one ImageUnlock (the object as kopf's own per-object
    lines name it: ``k8s_ref``; ``name`` itself is taken, by the logger's name)."""
    return {"k8s_ref": {"namespace": namespace, "name": name}, **({"reason": reason} if reason else {})}


def _context(record: logging.LogRecord) -> dict[str, str]:
    ref = getattr(record, "k8s_ref", None)  # ours (fields()) and kopf's per-object lines
    found = {key: str(ref[key]) for key in ("namespace", "name") if isinstance(ref, Mapping) and ref.get(key)}
    found.update({key: str(value) for key in FIELDS if (value := getattr(record, key, None))})
    return found


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = _context(record)
        where = ""
        if context:
            obj = "/".join(context[k] for k in ("namespace", "name") if k in context)
            rest = " ".join(f"{k}={context[k]}" for k in ("node", "reason") if k in context)
            where = " [" + " ".join(part for part in (obj, rest) if part) + "]"
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}{where}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": _timestamp(record),
            "severity": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _Node(logging.Filter):
    """Every line of an agent names its node."""

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "node", None):
            record.node = self.node
        return True


def configure(level: str, log_format: str, node: str | None = None) -> None:
    """One handler on the root logger (whatever was there: the CLI's default one would print
    every line twice), at ``level``; the libraries' own chatter held back."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if node:
        handler.addFilter(_Node(node))
    root.addHandler(handler)
    debug = level == "debug"
    root.setLevel(logging.DEBUG if debug else logging.WARNING if level == "warning" else logging.INFO)
    # kopf logs a success line per handler call (one per watch event): debug only.
    logging.getLogger("kopf.objects").setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.DEBUG if debug else logging.WARNING)
    # urllib3 and the docker SDK are chatty at debug level and add nothing we need. The
    # kubernetes client's loggers ("kubernetes", and its package logger "client") stay at
    # WARNING whatever our level: some versions log response bodies at DEBUG, and one of
    # the responses we read is a Secret.
    for noisy in ("urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.INFO if debug else logging.WARNING)
    for kube_logger in ("kubernetes", "client"):
        logging.getLogger(kube_logger).setLevel(logging.WARNING)
