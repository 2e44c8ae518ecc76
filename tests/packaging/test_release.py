"""The release workflow (.github/workflows/release.yaml; actionlint checks its syntax and
expressions in `make lint`): what it publishes is what the README promises — both
architectures through the project's own image build, the chart as an OCI artifact, an SBOM
per architecture — and only for a tag equal to the package's version."""

from __future__ import annotations

import re
from typing import Any

import yaml

from .conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "release.yaml"


def _runs(job: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def _uses(job: dict[str, Any]) -> list[str]:
    return [step["uses"].split("@")[0] for step in job["steps"] if "uses" in step]


def test_release_workflow_publishes_both_architectures_the_chart_and_sboms():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert workflow[True] == {"push": {"tags": ["v*.*.*"]}}  # YAML 1.1 reads the key `on` as True
    assert workflow["permissions"] == {}  # each job asks for what it needs
    jobs = workflow["jobs"]
    assert "make lint" in _runs(jobs["check"])
    assert '"v$version" != "$GITHUB_REF_NAME"' in _runs(jobs["check"])
    # The image: make push-images builds and pushes amd64, arm64 and the manifest list.
    assert re.search(r"^push-images:\n.*--push amd64 arm64$", (REPO / "Makefile").read_text(), re.M | re.S)
    assert "make push-images" in _runs(jobs["image"])
    sboms = [s["with"] for s in jobs["image"]["steps"] if s.get("uses", "").startswith("anchore/sbom-action@")]
    assert sorted(s["image"].rsplit("-", 1)[1] for s in sboms) == ["amd64", "arm64"]
    assert {s["format"] for s in sboms} == {"spdx-json"}
    # The chart: packaged (the CRD link resolved into it) and pushed as an OCI artifact.
    chart = _runs(jobs["chart"])
    assert "helm package chart/imageunlock-operator" in chart
    assert 'helm push "dist/imageunlock-operator-$VERSION.tgz" "oci://$CHARTS"' in chart
    assert jobs["chart"]["needs"] == ["check", "image"]  # never a chart whose image is missing
    assert "gh release create" in _runs(jobs["release"])
    assert {job: spec["permissions"] for job, spec in jobs.items() if "write" in spec["permissions"].values()} == {
        "image": {"contents": "read", "packages": "write"},
        "chart": {"contents": "read", "packages": "write"},
        "release": {"contents": "write"},
    }


def test_make_lint_runs_actionlint():
    lint = re.search(r"^lint:\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    assert lint and ".venv/bin/actionlint" in lint.group(1)
