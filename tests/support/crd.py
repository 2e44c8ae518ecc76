"""The ImageUnlock CRD's OpenAPI schema (crds/, the one the chart's copy is held equal to), and
pruning by it as the API server does: a field the schema does not declare is dropped on write."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "loader.azaion.com_imageunlocks.yaml"


@functools.cache
def schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the served version."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    [version] = crd["spec"]["versions"]
    found: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return found


def prune(value: Any, node: dict[str, Any]) -> Any:
    """``value`` without what ``node`` (a structural schema) does not declare: unknown object
    fields go (unless x-kubernetes-preserve-unknown-fields), lists and maps are pruned item by
    item. Values of the wrong type are left to validation, as the API server does."""
    if isinstance(value, dict) and node.get("type") == "object":
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return value
        properties = node.get("properties")
        if properties is not None:
            return {k: prune(v, properties[k]) for k, v in value.items() if k in properties}
        if isinstance(extra := node.get("additionalProperties"), dict):
            return {k: prune(v, extra) for k, v in value.items()}
        return {}
    if isinstance(value, list) and node.get("type") == "array":
        return [prune(item, node["items"]) for item in value]
    return value


def prune_status(status: dict[str, Any]) -> dict[str, Any]:
    pruned: dict[str, Any] = prune(status, schema()["properties"]["status"])
    return pruned
