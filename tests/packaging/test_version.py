"""One version and one image name: imageunlock.__version__ is the source; the chart, the
manifests, the Dockerfile's label and the installed distribution must all agree with it."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import yaml

import imageunlock

REPO = Path(__file__).resolve().parents[2]
IMAGE = "azaion/imageunlock"


def test_the_distribution_takes_its_version_from_the_package():
    assert importlib.metadata.version("imageunlock") == imageunlock.__version__
    assert 'dynamic = ["version"]' in (REPO / "pyproject.toml").read_text()


def test_chart_and_manifests_ship_this_version_under_one_image_name():
    chart = yaml.safe_load((REPO / "chart" / "imageunlock-operator" / "Chart.yaml").read_text())
    assert chart["appVersion"] == imageunlock.__version__
    values = yaml.safe_load((REPO / "chart" / "imageunlock-operator" / "values.yaml").read_text())
    assert values["image"]["repository"] == IMAGE
    for name, kind in (("daemonset.yaml", "DaemonSet"), ("controller.yaml", "Deployment")):
        docs = [d for d in yaml.safe_load_all((REPO / "manifests" / name).read_text()) if d]
        [workload] = [d for d in docs if d["kind"] == kind]
        [container] = workload["spec"]["template"]["spec"]["containers"]
        assert container["image"] == f"{IMAGE}:{imageunlock.__version__}", name
        assert workload["metadata"]["labels"]["app.kubernetes.io/version"] == imageunlock.__version__, name


def test_dockerfile_labels_this_version():
    labels = re.findall(r'org\.opencontainers\.image\.version="?([^"\s\\]+)', (REPO / "Dockerfile").read_text())
    assert labels and set(labels) <= {imageunlock.__version__, "${VERSION}", "$VERSION"}, labels
