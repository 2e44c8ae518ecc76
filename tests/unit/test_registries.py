"""The two registries. Runtimes (engine/runtimes): everything that names a runtime derives from
it, the CRD's enums equal it, and a runtime registered by a test (tests/support/fake_runtime.py)
works everywhere with no product edit. Key sources (engine/keys): spec.keySource is a union of
the registered members, and one registered by a test (tests/support/fake_key_source.py) unlocks
through the reconciler with no product edit. Both are the recipes of docs/architecture.md."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from imageunlock import cli
from imageunlock.agent.node import NodeAgent, resolve_runtime
from imageunlock.agent.reconciler import Reconciler, Verdict
from imageunlock.app.config import AgentConfig
from imageunlock.engine import keys, runtimes
from imageunlock.engine.crypto import encrypt_with_key
from imageunlock.engine.models import Credentials
from imageunlock.errors import ConfigurationError
from imageunlock.kube.nodes import NodeInfo
from imageunlock.kube.spec import check_runtime, parse_spec

from ..support import fake_key_source, fake_runtime
from ..support.fakes import FakeKubernetesApi, FakeRuntime
from ..support.savetar import build, config_ids

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "loader.azaion.com_imageunlocks.yaml"
VALUES_SCHEMA = ROOT / "chart" / "imageunlock-operator" / "values.schema.json"
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


def test_the_crd_and_chart_runtime_enums_are_the_registered_runtimes():
    schema = _schema()
    assert schema["spec"]["properties"]["runtime"]["enum"] == [*runtimes.names(), runtimes.AUTO]
    assert schema["status"]["properties"]["nodes"]["items"]["properties"]["runtime"]["enum"] == list(runtimes.names())
    values = json.loads(VALUES_SCHEMA.read_text())  # the chart's agent.runtime (IMAGEUNLOCK_RUNTIME)
    assert set(values["properties"]["agent"]["properties"]["runtime"]["enum"]) == {*runtimes.names(), runtimes.AUTO}


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
    assert check_runtime(parse_spec({**SPEC, "runtime": "fake"}, None, (API,)), "fake").runtime == "fake"
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
    with pytest.raises(ConfigurationError, match=r"spec.runtime .fake. is not one of docker, containerd, auto"):
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


# -- key sources ------------------------------------------------------------------------------


@pytest.fixture
def secret_key(monkeypatch: pytest.MonkeyPatch) -> Iterator[keys.KeySourceKind]:
    monkeypatch.setattr(keys, "_KINDS", dict(keys._KINDS))  # the registration ends with the test
    yield keys.register(fake_key_source.KIND)


def test_a_registered_key_source_unlocks_through_the_reconciler(secret_key, tmp_path):
    key = bytes(range(32))
    plain = build(["azaion/a:1.0"])
    archive = tmp_path / "images.enc"
    archive.write_bytes(b"".join(encrypt_with_key([plain], key)))
    kube = FakeKubernetesApi()
    kube.add_secret("ns", "keys", Credentials("k1", key.hex()))
    runtime = FakeRuntime()
    config = AgentConfig(archive_roots=(str(tmp_path),), api_url_allowlist=(API,), progress_interval=0.0)
    spec = {
        "archivePath": str(archive),
        "version": "1.0",
        "images": ["azaion/a"],
        "keySource": {"secretKey": {"label": "k1", "credentialsSecretRef": {"name": "keys"}}},
    }
    body = {"metadata": {"namespace": "ns", "name": "iu", "uid": "u", "generation": 1}, "spec": spec}
    assert (
        Reconciler(config, runtime, kube, NodeAgent(kube, "node-1", "docker")).reconcile(body).verdict == Verdict.READY
    )
    assert runtime.images == {"docker.io/azaion/a:1.0": config_ids(plain)["azaion/a:1.0"]}
    assert kube.credential_reads == [("ns", "keys")]  # the Secret of the object's own namespace
    phases = [entry["phase"] for _, _, entry in kube.entry_writes if entry and "phase" in entry]
    assert phases[:2] == ["Authenticating", "FetchingKey"]  # its own phases, reported as the resource API's are


def test_the_key_source_union_takes_one_registered_member(secret_key):
    member = {"label": "k1", "credentialsSecretRef": {"name": "keys"}}
    parsed = parse_spec({**_without_api(), "keySource": {"secretKey": member}}, None, (API,)).key_source
    assert parsed == fake_key_source.SecretKeySpec("secretKey", "keys", label="k1")
    with pytest.raises(ConfigurationError, match=r"spec\.keySource\.secretKey\.label is required"):
        parse_spec({**_without_api(), "keySource": {"secretKey": {"credentialsSecretRef": {"name": "k"}}}}, None)


def test_the_resource_api_is_a_member_of_the_union_and_keeps_its_top_level_field():
    api = {"url": API, "credentialsSecretRef": {"name": "creds"}}
    top = parse_spec(SPEC, None, (API,)).key_source
    assert parse_spec({**_without_api(), "keySource": {"resourceApi": api}}, None, (API,)).key_source == top
    assert top == keys.ResourceApiSpec("resourceApi", "creds", url=API)
    evil = {"keySource": {"resourceApi": {**api, "url": "https://evil.test"}}}
    with pytest.raises(
        ConfigurationError, match=r"spec\.keySource\.resourceApi\.url 'https://evil\.test' is not an allowed"
    ):
        parse_spec({**_without_api(), **evil}, None, (API,))


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"keySource": {"resourceApi": {"credentialsSecretRef": {"name": "c"}}}}, "both are set"),
        ({"resourceApi": None}, "neither is set"),
    ],
)
def test_exactly_one_of_key_source_and_resource_api(change, problem):
    with pytest.raises(ConfigurationError) as info:
        parse_spec({**SPEC, **change}, API, (API,))
    assert "give exactly one of spec.keySource and spec.resourceApi" in info.value.message
    assert problem in info.value.message


@pytest.mark.parametrize("union", [{}, {"tpm": {}}, {"resourceApi": {}, "secretKey": {}}, "resourceApi"])
def test_a_key_source_union_must_name_exactly_one_registered_member(union):
    with pytest.raises(
        ConfigurationError, match=r"spec\.keySource must name exactly one key source: one of resourceApi"
    ):
        parse_spec({**_without_api(), "keySource": union}, API, (API,))


def _without_api() -> dict[str, Any]:
    return {k: v for k, v in SPEC.items() if k != "resourceApi"}
