"""The API server's audit log (the local control plane writes one, a JSON event per line):
what a user really asked the API server for, read back instead of trusted from the code."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Request:
    verb: str
    group: str
    resource: str  # "imageunlocks/status" for a subresource
    namespaced: bool


def end(audit_log: Path) -> int:
    """Where the log ends now: pass it as ``since`` to read only what is logged from here on."""
    return audit_log.stat().st_size


def entries(audit_log: Path, user: str, since: int = 0) -> list[dict[str, Any]]:
    """The events of ``user``'s requests logged after byte ``since``, one per request (a watch
    still open has only reached the ResponseStarted stage, so that stage counts too). A last
    line the API server is still writing is left out."""
    with open(audit_log, "rb") as log:
        log.seek(since)
        lines = log.read().split(b"\n")[:-1]
    found, seen = [], set()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (
            entry.get("user", {}).get("username") != user
            or entry.get("stage") not in ("ResponseStarted", "ResponseComplete")
            or entry.get("auditID") in seen
        ):
            continue
        seen.add(entry.get("auditID"))
        found.append(entry)
    return found


def requests(events: list[dict[str, Any]]) -> Counter[Request]:
    """The resource requests among ``events`` (discovery, a non-resource URL every
    authenticated user may read, is left out), counted."""
    made: Counter[Request] = Counter()
    for entry in events:
        ref = entry.get("objectRef")
        if ref and ref.get("resource"):
            resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            made[Request(entry["verb"], ref.get("apiGroup", ""), resource, bool(ref.get("namespace")))] += 1
    return made


def refused(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests among ``events`` that the API server refused (403)."""
    return [entry for entry in events if entry.get("responseStatus", {}).get("code") == 403]


def reads(events: list[dict[str, Any]], resource: str, namespace: str, name: str) -> int:
    """How many of ``events`` are a ``get`` of the object ``namespace/name`` of ``resource``."""
    return sum(
        1
        for entry in events
        if entry.get("verb") == "get"
        and (entry.get("objectRef") or {}).get("resource") == resource
        and entry["objectRef"].get("namespace") == namespace
        and entry["objectRef"].get("name") == name
    )
