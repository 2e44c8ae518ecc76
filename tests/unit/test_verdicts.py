"""One login verdict for the fleet (issue 21, item 5): N agents with a wrong password cost the
resource API one refused login, not N. Each agent is a real Reconciler with its own node; they
share one pretend API server (the object's status, every node's entry in it, and the Secret)
and one real loopback resource API, which counts requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from imageunlock.agent.node import NodeAgent
from imageunlock.agent.reconciler import Reconciler, Verdict
from imageunlock.agent.verdicts import WAIT_FOR_LEADER
from imageunlock.app.config import AgentConfig
from imageunlock.engine.crypto import encrypt_stream
from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH
from imageunlock.engine.models import Credentials
from imageunlock.kube import conditions as st

from ..support.fakes import FakeKubernetesApi, FakeRuntime
from ..support.resource_api import FakeResourceApi
from ..support.savetar import build

NS, NAME, VERSION = "ns", "iu", "2.0"
IMAGES = ["azaion/flights", "azaion/autopilot"]
FRAGMENT = b"the-key-fragment"
EMAIL, PASSWORD = "edge@example.test", "right"
NODES = [f"edge-{i}" for i in range(5)]


class Fleet:
    def __init__(self, root: Path, api: FakeResourceApi) -> None:
        self.api, self.kube = api, FakeKubernetesApi()
        self.archive = root / "images.enc"
        self.archive.write_bytes(b"".join(encrypt_stream([build([f"{i}:{VERSION}" for i in IMAGES])], FRAGMENT)))
        config = AgentConfig(
            archive_roots=(str(root),), api_url_allowlist=(api.url,), api_retries=0, progress_interval=0.0
        )
        self.clock = [0.0]
        self.agents = {}
        for node in NODES:
            reconciler = Reconciler(
                config, FakeRuntime(), self.kube, NodeAgent(self.kube, node, "docker"), jitter=st.backoff
            )
            reconciler.verdicts.clock = lambda: self.clock[0]
            self.agents[node] = reconciler

    def secret(self, password: str, version: str) -> None:
        self.kube.add_secret(NS, "creds", Credentials(EMAIL, password), version=version)

    def body(self) -> dict[str, Any]:
        """The object as every agent's watch shows it now: all nodes' entries so far."""
        return {
            "apiVersion": "loader.azaion.com/v1alpha1",
            "kind": "ImageUnlock",
            "metadata": {"namespace": NS, "name": NAME, "uid": "uid-1", "generation": 1},
            "spec": {
                "archivePath": str(self.archive),
                "version": VERSION,
                "images": IMAGES,
                "resourceApi": {"url": self.api.url, "credentialsSecretRef": {"name": "creds"}},
            },
            "status": self.kube.status(NS, NAME),
        }

    def reconcile(self, node: str):
        return self.agents[node].reconcile(self.body())

    def entry(self, node: str) -> dict[str, Any]:
        return next(e for e in self.kube.status(NS, NAME)["nodes"] if e["name"] == node)


@pytest.fixture
def fleet(tmp_path: Path):
    with FakeResourceApi(EMAIL, PASSWORD, FRAGMENT) as api:
        yield Fleet(tmp_path, api)


def test_n_agents_with_a_wrong_password_cost_one_refused_login_not_n(fleet):
    fleet.secret("wrong", version="1")
    outcomes = [fleet.reconcile(node) for node in NODES]
    assert fleet.api.calls[LOGIN_PATH] == 1 and fleet.api.calls[KEY_FRAGMENT_PATH] == 0
    assert {(o.verdict, o.reason) for o in outcomes} == {(Verdict.STALLED, "AuthenticationFailed")}
    for node in NODES:  # every entry carries the verdict on, for the Secret version it holds for
        assert fleet.entry(node)["loginRefusedVersion"] == "1"
        assert fleet.entry(node)["reason"] == "AuthenticationFailed"
    assert "node edge-0" in fleet.entry("edge-3")["message"]  # whose verdict it took
    assert "wrong" not in str(fleet.kube.status(NS, NAME))


def test_a_changed_secret_is_tried_by_one_node_while_the_others_wait_for_its_verdict(fleet):
    fleet.secret("wrong", version="1")
    for node in NODES:
        fleet.reconcile(node)
    assert fleet.api.calls[LOGIN_PATH] == 1
    # the Secret changes, still wrong: the watch pokes every node at once; the last by name first
    fleet.secret("still-wrong", version="2")
    waiting = [fleet.reconcile(node) for node in reversed(NODES[1:])]
    assert {(o.verdict, o.reason) for o in waiting} == {(Verdict.RETRY, "AwaitingLoginVerdict")}
    assert fleet.api.calls[LOGIN_PATH] == 1  # none of them sent the password
    # their retries come before edge-0's verdict (their entries now say they wait): still waiting
    again = [fleet.reconcile(node) for node in NODES[1:]]
    assert {o.reason for o in again} == {"AwaitingLoginVerdict"} and fleet.api.calls[LOGIN_PATH] == 1
    assert fleet.reconcile("edge-0").verdict is Verdict.STALLED  # the first by name tries it
    assert fleet.api.calls[LOGIN_PATH] == 2
    again = [fleet.reconcile(node) for node in NODES[1:]]
    assert {(o.verdict, o.reason) for o in again} == {(Verdict.STALLED, "AuthenticationFailed")}
    assert fleet.api.calls[LOGIN_PATH] == 2  # four nodes, one refused login
    assert {fleet.entry(node)["loginRefusedVersion"] for node in NODES} == {"2"}
    # fixed: the first by name gets in, the others no longer wait for it and log in themselves
    fleet.secret(PASSWORD, version="3")
    assert fleet.reconcile("edge-2").reason == "AwaitingLoginVerdict"
    assert fleet.reconcile("edge-0").verdict is Verdict.READY
    assert all(fleet.reconcile(node).verdict is Verdict.READY for node in NODES[1:])
    assert "loginRefusedVersion" not in fleet.entry("edge-0")


def test_a_node_waits_for_a_first_one_that_is_gone_only_so_long(fleet):
    fleet.secret("wrong", version="1")
    for node in NODES:
        fleet.reconcile(node)
    fleet.secret(PASSWORD, version="2")
    assert fleet.reconcile("edge-1").reason == "AwaitingLoginVerdict"
    fleet.clock[0] += WAIT_FOR_LEADER  # edge-0 never tried (its agent is down)
    assert fleet.reconcile("edge-1").verdict is Verdict.READY
