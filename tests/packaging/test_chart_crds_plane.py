"""The chart's CRD through a real Helm lifecycle against the local API server (helm's Go SDK,
Helm 4, release history in Secrets): a CRD that `kubectl apply --server-side -f crds/` (or an
earlier chart's crds/ directory) installed is adopted with README's two commands and, once,
`--force-conflicts` (Helm 4 applies server side, and kubectl's field manager owns the
fields); `helm upgrade` then upgrades it; `helm uninstall` leaves it while crds.keep
(helm.sh/resource-policy: keep) and deletes it without.

The plane is an apiextensions API server: it serves CRDs, Namespaces and Secrets but no
workloads, so the release is the chart's own CRD template, helpers, values and schema alone
(copied as they are; the CRD read through files/crds as in the chart).
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART, CRD_FILE, OPERATOR_NAMESPACE, require

pytestmark = pytest.mark.e2e

CRD = "imageunlocks.loader.azaion.com"
RELEASE = "imageunlock-operator"
# README, "How the CRD installs and upgrades": hand a CRD from an earlier chart to Helm.
ADOPT = [
    ["label", "crd", CRD, "app.kubernetes.io/managed-by=Helm", "--overwrite"],
    [
        "annotate",
        "crd",
        CRD,
        f"meta.helm.sh/release-name={RELEASE}",
        f"meta.helm.sh/release-namespace={OPERATOR_NAMESPACE}",
        "--overwrite",
    ],
]


def _crd_chart(root: Path, printer_column: dict[str, Any] | None = None) -> Path:
    """The chart with only its CRD template: Chart.yaml, values, schema, helpers,
    templates/crds.yaml, and the CRD under files/crds (with ``printer_column`` added, to
    stand for the next version of the CRD)."""
    chart = root / "chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "files" / "crds").mkdir(parents=True)
    for name in ("Chart.yaml", "values.yaml", "values.schema.json", "templates/_helpers.tpl", "templates/crds.yaml"):
        shutil.copyfile(CHART / name, chart / name)
    crd = yaml.safe_load(CRD_FILE.read_text())
    if printer_column:
        crd["spec"]["versions"][0]["additionalPrinterColumns"].append(printer_column)
    (chart / "files" / "crds" / CRD_FILE.name).write_text(yaml.safe_dump(crd))
    return chart


def _force_conflicts(monkeypatch: pytest.MonkeyPatch, helm: Any) -> None:
    """`helm upgrade --force-conflicts`: Helm's SDK takes the option; helm-python 0.2.2's
    upgrade() has no argument for it, so it is added to the options it sends."""
    config = importlib.import_module(f"{helm.__name__}.config")
    opts = config._opts
    monkeypatch.setattr(config, "_opts", lambda **pairs: opts(**pairs, force_conflicts=True))


def _served(plane) -> dict[str, Any] | None:
    res = plane.kubectl("get", "crd", CRD, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def _columns(crd: dict[str, Any]) -> list[str]:
    return [c["name"] for c in crd["spec"]["versions"][0]["additionalPrinterColumns"]]


def test_helm_adopts_upgrades_and_keeps_the_crd(plane, tmp_path, monkeypatch):
    helm = require("helm_python")
    plane.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    plane.ensure_crd()  # as an earlier chart's crds/ (or kubectl apply -f crds/) left it
    chart = _crd_chart(tmp_path / "v1")
    column = {"name": "Archive", "type": "string", "jsonPath": ".spec.archivePath", "priority": 1}
    upgraded = _crd_chart(tmp_path / "v2", column)
    try:
        with helm.Config(kubeconfig_path=plane.kubeconfig, namespace=OPERATOR_NAMESPACE) as config:
            # Helm refuses to take over an object it did not create...
            with pytest.raises(helm.HelmError, match="invalid ownership metadata"):
                config.install(str(chart), RELEASE, namespace=OPERATOR_NAMESPACE)
            # ...until README's two commands hand it over.
            for args in ADOPT:
                plane.kubectl(*args)
            config.install(str(chart), RELEASE, namespace=OPERATOR_NAMESPACE)
            served = _served(plane)
            assert served and served["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
            assert "Archive" not in _columns(served)
            # helm upgrade upgrades the CRD (Helm never does for a chart's crds/ directory);
            # the first time, kubectl's server-side apply still owns its fields...
            with pytest.raises(helm.HelmError, match='conflict with "kubectl"'):
                config.upgrade(str(upgraded), RELEASE, namespace=OPERATOR_NAMESPACE)
            with monkeypatch.context() as patch:
                _force_conflicts(patch, helm)
                config.upgrade(str(upgraded), RELEASE, namespace=OPERATOR_NAMESPACE)
            served = _served(plane)
            assert served and _columns(served)[-1] == "Archive"
            # ...from then on Helm does: a plain upgrade (back to this version) applies.
            config.upgrade(str(chart), RELEASE, namespace=OPERATOR_NAMESPACE)
            served = _served(plane)
            assert served and "Archive" not in _columns(served)
            # helm uninstall leaves it (and every ImageUnlock) in place...
            config.uninstall(RELEASE)
            assert _served(plane) is not None
            # ...unless crds.keep=false.
            config.install(str(chart), RELEASE, {"crds": {"keep": False}}, namespace=OPERATOR_NAMESPACE)
            served = _served(plane)
            assert served and "helm.sh/resource-policy" not in served["metadata"].get("annotations", {})
            config.uninstall(RELEASE)
            plane.kubectl("wait", "--for=delete", f"crd/{CRD}", "--timeout=60s")
            assert _served(plane) is None
    finally:
        plane.kubectl("delete", "secret", "-n", OPERATOR_NAMESPACE, "-l", f"name={RELEASE},owner=helm", check=False)
        plane.ensure_crd()  # the other tests' CRD, as kubectl applies it
