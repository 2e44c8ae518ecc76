"""Label keys and values (pure): Kubernetes' grammar for them, and what makes a key fit for
``spec.readinessLabel`` — the one label the controller writes on Nodes (controller/readiness.py).

The CRD says the same with a pattern and CEL rules (the API server refuses a bad spec at
``kubectl apply``); this module is the operator's own check, for a cluster that runs an older
CRD.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A label key: optional DNS-1123 subdomain prefix (labels of [a-z0-9-], neither starting nor
# ending with '-', joined by single dots; at most MAX_PREFIX characters, checked apart), then
# a name (Kubernetes' qualified name). Anything looser is refused by the API server (HTTP 422)
# when the controller patches a Node. Plain groups: the CRD's pattern for spec.readinessLabel
# is this very string (tests hold them equal).
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
LABEL_KEY = rf"^({_DNS_LABEL}([.]{_DNS_LABEL})*/)?{_NAME}$"
LABEL_VALUE = rf"^({_NAME})?$"
MAX_PREFIX = 253
MAX_KEY = MAX_PREFIX + 1 + 63
# Prefixes Kubernetes reserves for its own components (kubelet's hostname, topology, roles):
# a readiness label there would remove a label the cluster depends on from every node.
RESERVED = re.compile(r"^(?:[^/]*\.)?(?:kubernetes\.io|k8s\.io)/")


def is_label_key(key: object) -> bool:
    return (
        isinstance(key, str)
        and len(key) <= MAX_KEY
        and len(key.rpartition("/")[0]) <= MAX_PREFIX
        and re.fullmatch(LABEL_KEY, key) is not None
    )


def is_label_value(value: object) -> bool:
    return isinstance(value, str) and re.fullmatch(LABEL_VALUE, value) is not None


def readiness_key_problem(key: object) -> str | None:
    """Why ``key`` cannot be a readiness label's key, or None."""
    if not is_label_key(key):
        return f"spec.readinessLabel {key!r} is not a valid label key ([prefix/]name, e.g. example.com/images)"
    if RESERVED.match(str(key)):
        return f"spec.readinessLabel {key!r} uses a prefix Kubernetes reserves (kubernetes.io, k8s.io)"
    return None


def readiness_problems(key: object, version: object, selector_keys: Iterable[str] = ()) -> list[str]:
    """Every reason ``spec.readinessLabel`` cannot be set as ``<key>=<spec.version>``."""
    problems = [p] if (p := readiness_key_problem(key)) else []
    if not version or not is_label_value(version):
        problems.append(
            f"spec.version {version!r} is not a valid label value (at most 63 characters, starting and ending "
            "with a letter or digit), so spec.readinessLabel cannot carry it"
        )
    if key in set(selector_keys):
        problems.append(
            f"spec.readinessLabel {key!r} is also a key of spec.nodeSelector: the label would select itself"
        )
    return problems
