"""The runtime registry (engine/runtimes): everything that names a runtime derives from it,
the CRD's enums equal it, and a runtime registered by a test (tests/support/fake_runtime.py)
works everywhere with no product edit: the recipe of docs/architecture.md."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imageunlock import cli
from imageunlock.agent.node import resolve_runtime
from imageunlock.app.config import AgentConfig
from imageunlock.engine import runtimes
from imageunlock.errors import ConfigurationError
from imageunlock.kube.nodes import NodeInfo
from imageunlock.kube.spec import parse_spec

from ..support import fake_runtime

CRD = Path(__file__).resolve().parents[2] / "crds" / "loader.azaion.com_imageunlocks.yaml"
API = "https://api.test"
SPEC = {
    "archivePath": "/var/lib/imageunlock/images.enc",
    "version": "1.0",
    "resourceApi": {"url": API, "credentialsSecretRef": {"name": "creds"}},
}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[runtimes.RuntimeKind]:
    monkeypatch.setattr(runtimes, "_KINDS", dict(runtimes._KINDS))  # the registration ends with the test
    yield runtimes.register(fake_runtime.KIND)


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]


def test_the_crd_runtime_enums_are_the_registered_runtimes():
    schema = _schema()
    assert schema["spec"]["properties"]["runtime"]["enum"] == [*runtimes.names(), runtimes.AUTO]
    assert schema["status"]["properties"]["nodes"]["items"]["properties"]["runtime"]["enum"] == list(runtimes.names())


def test_a_registered_runtime_is_built_with_its_settings(fake):
    built = runtimes.make_runtime("fake", timeout=7, fake_store="disk", docker_host="ignored")
    assert isinstance(built, fake_runtime.ConfiguredFakeRuntime)
    assert (built.name, built.store, built.timeout) == ("fake", "disk", 7)
    assert runtimes.make_runtime("fake").store == "memory"  # type: ignore[attr-defined]


def test_the_agent_settings_take_a_registered_runtime_and_its_variables(fake):
    config = AgentConfig.from_env(
        {"RESOURCE_API_URL": API, "IMAGEUNLOCK_RUNTIME": "fake", "IMAGEUNLOCK_FAKE_STORE": "disk"}
    )
    assert config.runtime == "fake" and config.runtime_settings["fake_store"] == "disk"
    assert config.runtime_settings["containerd_namespace"] == "k8s.io"  # every runtime's settings, defaulted


def test_the_spec_and_the_node_detection_take_a_registered_runtime(fake):
    assert parse_spec({**SPEC, "runtime": "fake"}, None, (API,), runtime="fake").runtime == "fake"
    node = NodeInfo.from_object(
        {"metadata": {"name": "n"}, "status": {"nodeInfo": {"containerRuntimeVersion": "fake://1"}}}
    )
    assert node.runtime == "fake" and resolve_runtime("auto", node, "n") == "fake"
    with pytest.raises(ConfigurationError) as unknown:
        resolve_runtime("auto", NodeInfo("n"), "n")
    assert "neither docker://, containerd:// nor fake://" in unknown.value.message
    assert "IMAGEUNLOCK_RUNTIME to docker, containerd or fake" in unknown.value.message


def test_the_cli_has_a_registered_runtimes_choice_and_flags(fake):
    args = cli._parser().parse_args(["unlock", "--runtime", "fake", "--fake-store", "disk"])
    assert (args.runtime, args.fake_store) == ("fake", "disk")


def test_an_unregistered_runtime_is_refused_everywhere():
    with pytest.raises(ConfigurationError, match="unknown container runtime 'fake'"):
        runtimes.make_runtime("fake")
    with pytest.raises(ConfigurationError, match="IMAGEUNLOCK_RUNTIME='fake'"):
        AgentConfig.from_env({"RESOURCE_API_URL": API, "IMAGEUNLOCK_RUNTIME": "fake"})
    with pytest.raises(ConfigurationError, match="spec.runtime 'fake' is not one of docker, containerd, auto"):
        parse_spec({**SPEC, "runtime": "fake"}, None, (API,))
    assert runtimes.runtime_of("fake://1") is None
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["unlock", "--runtime", "fake"])


def test_the_shared_classifier_reads_only_the_words_outside_paths(fake):
    classifier = fake.classifier
    assert classifier.verdict("dial: fake socket gone") == "unreachable"
    assert classifier.verdict("write /x/y: fake disk full") == "node"
    assert classifier.verdict("open /a/fake disk full/b: no such file") == "content"  # the words sit in a path


def test_building_containerd_does_not_import_the_docker_sdk():
    code = (
        "import sys; from imageunlock.engine import runtimes; runtimes.make_runtime('containerd');"
        "import imageunlock.kube.spec, imageunlock.kube.nodes, imageunlock.app.config;"
        "sys.exit('docker' in sys.modules or 'imageunlock.engine.runtimes.docker' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
