"""The CRD's CEL rules (``x-kubernetes-validations``) as the API server enforces them: label
selectors the OpenAPI schema cannot refuse — In/NotIn without values, Exists/DoesNotExist
with values, matchLabels that matchExpressions contradict — are refused on create, with the
rule's message, before any agent would stall on them; the valid forms are accepted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ..support.cluster import spec_for, unlock_object

pytestmark = pytest.mark.e2e

SELECTOR = "spec.nodeSelector"
EXPRESSION = f"{SELECTOR}.matchExpressions[0]"

# case: (spec.nodeSelector, the field the API server names, its message)
REFUSED: dict[str, tuple[dict[str, Any], str, str]] = {
    "In without values": (
        {"matchExpressions": [{"key": "role", "operator": "In"}]},
        f"{EXPRESSION}.values",
        "operator In needs at least one value",
    ),
    "In with empty values": (
        {"matchExpressions": [{"key": "role", "operator": "In", "values": []}]},
        f"{EXPRESSION}.values",
        "operator In needs at least one value",
    ),
    "NotIn without values": (
        {"matchExpressions": [{"key": "role", "operator": "NotIn"}]},
        f"{EXPRESSION}.values",
        "operator NotIn needs at least one value",
    ),
    "Exists with values": (
        {"matchExpressions": [{"key": "role", "operator": "Exists", "values": ["edge"]}]},
        f"{EXPRESSION}.values",
        "operator Exists takes no values",
    ),
    "DoesNotExist with values": (
        {"matchExpressions": [{"key": "role", "operator": "DoesNotExist", "values": ["edge"]}]},
        f"{EXPRESSION}.values",
        "operator DoesNotExist takes no values",
    ),
    "matchLabels key DoesNotExist": (
        {"matchLabels": {"role": "edge"}, "matchExpressions": [{"key": "role", "operator": "DoesNotExist"}]},
        SELECTOR,
        "matchLabels and matchExpressions contradict each other",
    ),
    "matchLabels value NotIn": (
        {
            "matchLabels": {"role": "edge"},
            "matchExpressions": [{"key": "role", "operator": "NotIn", "values": ["core", "edge"]}],
        },
        SELECTOR,
        "matchLabels and matchExpressions contradict each other",
    ),
    "matchLabels value not In": (
        {"matchLabels": {"role": "edge"}, "matchExpressions": [{"key": "role", "operator": "In", "values": ["core"]}]},
        SELECTOR,
        "matchLabels and matchExpressions contradict each other",
    ),
}

# Selectors that must stay valid: the rules refuse only what can never select a node.
ACCEPTED: dict[str, dict[str, Any]] = {
    "In and NotIn with values, Exists and DoesNotExist without": {
        "matchExpressions": [
            {"key": "kubernetes.io/arch", "operator": "In", "values": ["arm64", "amd64"]},
            {"key": "azaion.com/site", "operator": "NotIn", "values": ["lab"]},
            {"key": "azaion.com/edge", "operator": "Exists"},
            {"key": "azaion.com/retired", "operator": "DoesNotExist", "values": []},
        ]
    },
    "matchLabels agreeing with matchExpressions on a key": {
        "matchLabels": {"role": "edge", "kubernetes.io/os": "linux"},
        "matchExpressions": [
            {"key": "role", "operator": "In", "values": ["edge", "core"]},
            {"key": "role", "operator": "NotIn", "values": ["lab"]},
            {"key": "role", "operator": "Exists"},
            {"key": "site", "operator": "DoesNotExist"},
        ],
    },
    "matchLabels alone": {"matchLabels": {"role": "edge"}},
    "empty selector": {},
}


def _apply(cluster, namespace: str, name: str, selector: dict[str, Any]):
    spec = spec_for("/var/lib/imageunlock/images.enc", "1.0", "creds", nodeSelector=selector)
    manifest = json.dumps(unlock_object(namespace, name, spec))
    return cluster.kubectl("apply", "-f", "-", input=manifest, check=False)


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_selectors_are_refused_by_the_api_server(cluster, namespace, case):
    selector, field, message = REFUSED[case]
    result = _apply(cluster, namespace, "bad", selector)
    assert result.returncode != 0, f"accepted: {selector}"
    assert f"{field}: Invalid value" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr
    assert not cluster.kubectl("get", "iu", "-n", namespace, "-o", "name").stdout.strip()


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_valid_selectors_are_accepted(cluster, namespace, case):
    result = _apply(cluster, namespace, "good", ACCEPTED[case])
    assert result.returncode == 0, result.stderr
    stored = json.loads(cluster.kubectl("get", "iu", "good", "-n", namespace, "-o", "json").stdout)
    assert stored["spec"].get("nodeSelector", {}) == ACCEPTED[case]


# spec.readinessLabel (issue 20, item 4): case -> (spec fields, what the API server says)
READINESS_REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "not a label key": ({"readinessLabel": "not a key"}, "spec.readinessLabel: Invalid value"),
    "an empty DNS label in the prefix": (
        {"readinessLabel": "team-b..example.com/ready"},
        "spec.readinessLabel: Invalid value",
    ),
    "a DNS label starting with '-'": (
        {"readinessLabel": "team-b.-x.example.com/ready"},
        "spec.readinessLabel: Invalid value",
    ),
    "a prefix of 254 characters": (
        {"readinessLabel": f"{'a' * 250}.com/x"},
        "prefix of spec.readinessLabel (before '/') must be at most 253",
    ),
    "a reserved prefix": (
        {"readinessLabel": "node.kubernetes.io/images"},
        "must not use a prefix Kubernetes reserves",
    ),
    "a version that is no label value": (
        {"readinessLabel": "unlock.loader.azaion.com/images", "version": "_1.0"},
        "spec.version must be a valid label value",
    ),
    "a key of its own selector": (
        {"readinessLabel": "role", "nodeSelector": {"matchLabels": {"role": "edge"}}},
        "must not be a key of spec.nodeSelector",
    ),
}


@pytest.mark.parametrize("case", list(READINESS_REFUSED))
def test_bad_readiness_labels_are_refused_by_the_api_server(cluster, namespace, case):
    fields, message = READINESS_REFUSED[case]
    spec = {**spec_for("/var/lib/imageunlock/images.enc", "1.0", "creds"), **fields}
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(unlock_object(namespace, "bad", spec)), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr


def test_a_qualified_readiness_label_is_accepted(cluster, namespace):
    spec = spec_for("/var/lib/imageunlock/images.enc", "1.0.0", "creds", readinessLabel="unlock.loader.azaion.com/x")
    result = cluster.kubectl("apply", "-f", "-", input=json.dumps(unlock_object(namespace, "good", spec)), check=False)
    assert result.returncode == 0, result.stderr
