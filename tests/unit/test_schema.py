"""The models (kube/models.py) and the CRD's OpenAPI schema declare the same fields, both ways:
no field the operator writes is pruned by the API server, none the server holds is unknown to
the operator. Compared: the field names (at every depth), their types, which are required, the
enums a model declares; not the descriptions, defaults, patterns, limits or CEL rules
(x-kubernetes-validations), which only the CRD carries.

This is what makes a per-node status field a two-place change (NodeEntry and the CRD, see
docs/architecture.md): add it to one only and this test names it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from imageunlock.kube.models import Image, ImageUnlockSpec, ImageUnlockStatus, NodeEntry

from ..support.crd import prune, prune_status, schema


def crd(*path: str) -> dict[str, Any]:
    node = schema()
    for name in path:
        node = node["items"] if name == "[]" else node["properties"][name]
    return node


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its references resolved and ``X | None`` read as ``X``."""
    raw = model.model_json_schema(by_alias=True)
    defs = raw.get("$defs", {})

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        if "$ref" in node:
            return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
        if "anyOf" in node:
            [inner] = [n for n in node["anyOf"] if n != {"type": "null"}]
            return resolve(inner)
        resolved = dict(node)
        if "properties" in node:
            resolved["properties"] = {name: resolve(child) for name, child in node["properties"].items()}
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                resolved[key] = resolve(node[key])
        return resolved

    return resolve(raw)


def differences(model: dict[str, Any], crd: dict[str, Any], path: str) -> list[str]:
    """Where a model's schema and the CRD's disagree, one line per field."""
    found = []
    if model.get("type") != crd.get("type"):
        found.append(f"{path}: type {model.get('type')} in the model, {crd.get('type')} in the CRD")
    if "enum" in model and sorted(model["enum"]) != sorted(crd.get("enum", [])):
        # a model may leave open what the CRD enumerates (runtime names: their registry holds them)
        found.append(f"{path}: enum {sorted(model['enum'])} in the model, {crd.get('enum')} in the CRD")
    ours, theirs = model.get("properties", {}), crd.get("properties", {})
    found += [f"{path}.{name}: in the model only (the API server would prune it)" for name in ours.keys() - theirs]
    found += [f"{path}.{name}: in the CRD only (the operator would drop it)" for name in theirs.keys() - ours]
    for name in ours.keys() & theirs:
        found += differences(ours[name], theirs[name], f"{path}.{name}")
    if sorted(model.get("required", [])) != sorted(crd.get("required", [])):
        found.append(f"{path}: required {model.get('required', [])} in the model, {crd.get('required', [])} in the CRD")
    for key, mark in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(model.get(key), dict) or isinstance(crd.get(key), dict):
            found += differences(model.get(key) or {}, crd.get(key) or {}, path + mark)
    return sorted(found)


PAIRS = {
    "spec": (ImageUnlockSpec, ("spec",)),
    "status": (ImageUnlockStatus, ("status",)),
    "status.nodes[]": (NodeEntry, ("status", "nodes", "[]")),
}


@pytest.mark.parametrize("where", PAIRS)
def test_the_model_and_the_crd_declare_the_same_fields_both_ways(where):
    model, path = PAIRS[where]
    assert differences(model_schema(model), crd(*path), where) == []


def test_a_field_on_one_side_only_is_named():
    """The test above bites: an entry field the CRD lacks, and one the CRD holds that the model
    lacks, each named with its path."""

    class Extra(NodeEntry):
        checksum: str | None = None

    entry = crd("status", "nodes", "[]")
    assert differences(model_schema(Extra), entry, "status.nodes[]") == [
        "status.nodes[].checksum: in the model only (the API server would prune it)"
    ]
    more = {**entry, "properties": {**entry["properties"], "checksum": {"type": "string"}}}
    assert differences(model_schema(NodeEntry), more, "status.nodes[]") == [
        "status.nodes[].checksum: in the CRD only (the operator would drop it)"
    ]
    assert differences(model_schema(Extra), more, "status.nodes[]") == []


def test_a_full_entry_and_summary_survive_pruning_whole():
    """Everything the models can hold is kept by the API server (the fake prunes as it does)."""
    image = Image(name="azaion/flights:1.4.2", id="sha256:" + "a" * 64)
    entry = NodeEntry(
        name="edge-1",
        runtime="docker",
        phase="Ready",
        reason="Unlocked",
        message="7 image(s) loaded and verified",
        observed_generation=3,
        images=[image],
        images_digest="sha256:" + "b" * 64,
        progress={"bytes_done": 1, "bytes_total": 2, "percent": 50},
        last_unlock_time="2026-01-01T00:00:00Z",
        last_verified_time="2026-01-01T00:00:01Z",
        last_handled_requested_at="now",
        reclaimed={
            "policy": "Delete",
            "version": "1.4.1",
            "count": 1,
            "refs": ["docker.io/azaion/flights:1.4.1"],
            "kept": ["docker.io/azaion/annotations:1.4.1"],
            "time": "2026-01-01T00:00:02Z",
        },
        login_refused_version="42",
    )
    assert set(entry.dump()) == set(NodeEntry.model_json_schema(by_alias=True)["properties"])  # every field
    status = ImageUnlockStatus(
        observed_generation=3,
        phase="Ready",
        ready_nodes="1/1",
        nodes_ready=1,
        nodes_desired=1,
        nodes=[entry],
        message="ready",
        last_unlock_time="2026-01-01T00:00:00Z",
        last_verified_time="2026-01-01T00:00:01Z",
        last_handled_requested_at="now",
        progress={"bytes_done": 2, "bytes_total": 2, "percent": 100, "text": "100%"},
        images=[{"name": image.name, "id": image.id, "present": True}],
        conditions=[
            {
                "type": "Ready",
                "status": "True",
                "reason": "Unlocked",
                "message": "ready",
                "observed_generation": 3,
                "last_transition_time": "2026-01-01T00:00:00Z",
            }
        ],
    )
    assert prune_status(status.dump()) == status.dump()
    assert prune_status({**status.dump(), "nodes": [{**entry.dump(), "unknown": 1}]})["nodes"] == [entry.dump()]


def test_pruning_drops_what_the_schema_does_not_declare():
    node = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "object", "properties": {}}}}}
    assert prune({"a": [{"x": 1}], "b": 2}, node) == {"a": [{}]}
    labels = {"type": "object", "additionalProperties": {"type": "string"}}
    assert prune({"role": "edge"}, labels) == {"role": "edge"}
