"""Issue 20, items 1 and 2: which images are given back (engine/reclaim.py, pure) and when the
agent gives them back (agent/reclaim.py, reconciler): only what it loaded for that very
ImageUnlock, nothing any current spec names, and only after the new version is Ready."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from imageunlock.agent.node import NodeAgent
from imageunlock.agent.reclaim import Reclaimer
from imageunlock.agent.reconciler import Reconciler, Verdict
from imageunlock.app.config import AgentConfig
from imageunlock.engine.crypto import encrypt_stream
from imageunlock.engine.keys import resource_api
from imageunlock.engine.models import Credentials, OwnershipRecord
from imageunlock.engine.reclaim import (
    DEFAULT_POLICY,
    Reclaimed,
    ReclaimPolicy,
    orphaned,
    parse_policy,
    reclaimable,
    superseded,
    versions,
    wanted,
    wanted_by,
)
from imageunlock.engine.refs import normalize_ref
from imageunlock.errors import AuthenticationError, KubernetesUnavailableError

from ..support.fakes import FakeKeyClient, FakeKubernetesApi, FakeRuntime
from ..support.savetar import build

OWNER = "ns/iu"
OLD = ["docker.io/azaion/autopilot:1.0", "docker.io/azaion/flights:1.0"]  # sorted, as reclaims report
NEW = ["docker.io/azaion/autopilot:2.0", "docker.io/azaion/flights:2.0"]


def records(owner: str, refs: list[str]) -> list[OwnershipRecord]:
    return [OwnershipRecord(ref, owner) for ref in refs]


# -- the rule (pure) -----------------------------------------------------------------------


def test_only_the_owners_refs_that_no_spec_wants_are_reclaimable():
    owned = records(OWNER, OLD + NEW) + records("ns/other", ["docker.io/azaion/gps:1.0"])
    assert reclaimable(owned, OWNER, ["azaion/flights:2.0", "azaion/autopilot:2.0"]) == sorted(OLD)
    # another ImageUnlock's current spec names one of them (in another spelling): it stays
    keep = ["azaion/flights:2.0", "azaion/autopilot:2.0", "index.docker.io/azaion/flights:1.0"]
    assert reclaimable(owned, OWNER, keep) == ["docker.io/azaion/autopilot:1.0"]
    assert reclaimable(owned, "ns/nobody", []) == []


def test_what_specs_want_is_read_from_raw_specs_with_the_default_images():
    assert wanted([{"version": "2.0", "images": ["azaion/flights"]}]) == {"docker.io/azaion/flights:2.0"}
    assert "docker.io/azaion/annotations:3" in wanted([{"version": "3"}])  # the CRD's default images
    assert wanted([{"images": ["azaion/flights"]}, {}]) == set()  # no version: nothing named


def unlock(namespace: str, version: str, *images: str, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": namespace, "name": "iu"},
        "spec": {"version": version, "images": list(images), **spec},
    }


def test_with_image_owners_a_spec_keeps_only_names_its_namespace_may_unlock():
    """Tenant B naming team A's image at A's old version — refused by B's own unlock, even with
    a nodeSelector matching no node — must not stop A's Unpin/Delete on every node."""
    records = [OwnershipRecord("docker.io/team-a/app:1.0", "team-a/iu")]
    team_a = unlock("team-a", "2.0", "docker.io/team-a/app")
    squatter = unlock("team-b", "1.0", "team-a/app", nodeSelector={"matchLabels": {"x": "none"}})
    owners = {"team-a": ("team-a/",), "team-b": ("team-b/",)}
    assert reclaimable(records, "team-a/iu", wanted_by([team_a, squatter], owners)) == ["docker.io/team-a/app:1.0"]
    # a namespace the setting does not name may unlock nothing, so keeps nothing
    assert wanted_by([unlock("team-c", "1.0", "team-a/app")], owners) == set()
    # team A's own spec (and one of its namespace naming it at the old version) still keeps it
    assert wanted_by([team_a, unlock("team-a", "1.0", "team-a/app")], owners) == {
        "docker.io/team-a/app:2.0",
        "docker.io/team-a/app:1.0",
    }


def test_without_image_owners_any_spec_keeps_any_name_it_names():
    """One tenant (IMAGEUNLOCK_IMAGE_OWNERS unset): whatever any ImageUnlock names is kept."""
    records = [OwnershipRecord("docker.io/team-a/app:1.0", "team-a/iu")]
    objects = [unlock("team-a", "2.0", "team-a/app"), unlock("team-b", "1.0", "team-a/app")]
    assert wanted_by(objects) == wanted_by(objects, {}) == wanted(o["spec"] for o in objects)
    assert reclaimable(records, "team-a/iu", wanted_by(objects)) == []


def test_the_agent_reclaims_past_a_foreign_spec_when_image_owners_are_set(node, tmp_path):
    runtime, kube, reclaimer, load = node
    load(OWNER, OLD + NEW)
    # another namespace names this one's old version: with owners set it may not unlock azaion/
    kube.objects = [body(), {**body(name="squat", version="1.0"), "metadata": {"namespace": "other", "name": "squat"}}]
    entry = NodeAgent(kube, "edge-1", "fake").entry(body())
    assert reclaimer.after_ready(body(), entry) is None  # no owners configured: it keeps them
    owners = {"ns": ("azaion/",), "other": ("other/",)}
    strict = Reclaimer(runtime, kube, "edge-1", reclaimer.entry, directory=str(tmp_path), owners=owners)
    done = strict.after_ready(body(), entry)
    assert done is not None and done.reclaimed is not None and sorted(done.reclaimed.refs) == OLD


def test_without_ownership_records_only_refs_still_holding_the_verified_image_are_superseded():
    previous = {OLD[0]: "sha256:a", OLD[1]: "sha256:b", NEW[0]: "sha256:c"}
    present = {OLD[0]: "sha256:a", OLD[1]: "sha256:retagged", NEW[0]: "sha256:c"}
    assert superseded(previous, present, NEW) == [OLD[0]]
    assert superseded(previous, {OLD[0]: None}, []) == []  # gone already


def test_refs_of_deleted_imageunlocks_are_orphaned_per_owner():
    owned = records(OWNER, OLD) + records("ns/gone", NEW)
    assert orphaned(owned, [OWNER]) == {"ns/gone": sorted(NEW)}
    assert orphaned(owned, [OWNER, "ns/gone"]) == {}


def test_policy_default_and_message():
    assert parse_policy(None) is DEFAULT_POLICY is ReclaimPolicy.UNPIN
    assert parse_policy("Delete") is ReclaimPolicy.DELETE
    assert parse_policy("Shred") is ReclaimPolicy.UNPIN  # a newer CRD's value: the milder default
    assert versions([*OLD, "azaion/x:1.1"]) == "1.0, 1.1"
    assert Reclaimed(ReclaimPolicy.UNPIN, tuple(OLD)).message() == "unpinned 2 image(s) of 1.0"
    deleted = Reclaimed(ReclaimPolicy.DELETE, (OLD[0],), (OLD[1],))
    assert deleted.message() == f"removed 1 image(s) of 1.0; kept 1 a container uses ({OLD[1]})"


# -- the agent's reclaimer -----------------------------------------------------------------


def body(name: str = "iu", version: str = "2.0", generation: int = 2, ready: bool = True, **spec: Any):
    entry = {"name": "edge-1", "phase": "Ready", "observedGeneration": generation}
    return {
        "metadata": {"namespace": "ns", "name": name, "generation": generation, "uid": f"uid-{name}"},
        "spec": {"version": version, "images": ["azaion/flights", "azaion/autopilot"], **spec},
        "status": {"nodes": [entry] if ready else []},
    }


@pytest.fixture
def node(tmp_path: Path):
    runtime, kube = FakeRuntime(), FakeKubernetesApi()
    agent = NodeAgent(kube, "edge-1", "fake")

    def load(owner: str, refs: list[str], image: str = "sha256:") -> None:
        for ref in refs:
            image_id = image + ref
            runtime.add({ref: image_id})
            runtime.owners[normalize_ref(ref)] = (owner, image_id)
            runtime.pinned.add(normalize_ref(ref))

    reclaimer = Reclaimer(runtime, kube, "edge-1", agent.entry, directory=str(tmp_path))
    return runtime, kube, reclaimer, load


def test_after_ready_unpins_the_earlier_version_and_never_anothers_image(node):
    runtime, kube, reclaimer, load = node
    load(OWNER, OLD + NEW)
    load("ns/other", ["docker.io/azaion/gps:1.0"])
    runtime.add({"docker.io/azaion/manual:1.0": "sha256:m"})  # loaded by hand: no ownership record
    runtime.pinned.add("docker.io/azaion/manual:1.0")
    current = body()
    kube.objects = [current]
    agent_entry = NodeAgent(kube, "edge-1", "fake").entry(current)
    entry = reclaimer.after_ready(current, agent_entry)
    assert entry is not None and entry.reclaimed is not None
    assert (entry.reclaimed.policy, entry.reclaimed.version, sorted(entry.reclaimed.refs)) == ("Unpin", "1.0", OLD)
    assert runtime.pinned == {*NEW, "docker.io/azaion/gps:1.0", "docker.io/azaion/manual:1.0"}
    assert [(e.reason, e.message) for e in kube.events] == [("Reclaimed", "node edge-1: unpinned 2 image(s) of 1.0")]
    assert reclaimer.after_ready(current, agent_entry) is None  # nothing left to do: no event
    assert len(kube.events) == 1


def test_a_ref_another_imageunlocks_spec_names_is_not_reclaimed(node):
    runtime, kube, reclaimer, load = node
    load(OWNER, OLD + NEW)
    kube.objects = [body(), body(name="pinned-old", version="1.0")]
    reclaimer.after_ready(body(reclaimPolicy="Delete"), NodeAgent(kube, "edge-1", "fake").entry(body()))
    assert set(runtime.images) >= set(OLD)
    assert kube.events == []


def test_delete_keeps_an_image_a_container_uses_and_retain_touches_nothing(node):
    runtime, kube, reclaimer, load = node
    load(OWNER, OLD + NEW)
    kube.objects = [body()]
    entry = NodeAgent(kube, "edge-1", "fake").entry(body())
    assert reclaimer.after_ready(body(reclaimPolicy="Retain"), entry) is None
    assert OLD[0] in runtime.pinned and OLD[0] in runtime.images
    runtime.in_use.add("sha256:" + OLD[1])
    done = reclaimer.after_ready(body(reclaimPolicy="Delete"), entry)
    assert done is not None and done.reclaimed is not None
    assert (done.reclaimed.refs, done.reclaimed.kept) == ([OLD[0]], [OLD[1]])
    assert OLD[0] not in runtime.images and OLD[1] in runtime.images
    assert set(NEW) <= set(runtime.images)


def test_a_deleted_imageunlock_releases_all_its_refs_with_its_policy(node):
    runtime, kube, reclaimer, load = node
    load(OWNER, NEW)
    load("ns/other", OLD)
    kube.objects = [body(name="other", version="1.0")]
    done = reclaimer.deleted("ns", "iu", ReclaimPolicy.DELETE)
    assert done is not None and sorted(done.done) == NEW
    assert not set(NEW) & set(runtime.images) and set(OLD) <= set(runtime.images)
    assert reclaimer.deleted("ns", "other", ReclaimPolicy.UNPIN) is None  # it still exists: nothing


def test_the_sweep_catches_a_missed_delete_and_keeps_a_retained_ones_images(node, tmp_path):
    runtime, kube, reclaimer, load = node
    load(OWNER, NEW)
    load("ns/kept", OLD)
    reclaimer.seen(body(name="kept", version="1.0", reclaimPolicy="Retain"))
    kube.objects = []  # both deleted while no event reached the agent
    # a restarted agent: the policies it saw are on disk
    again = Reclaimer(runtime, kube, "edge-1", reclaimer.entry, directory=str(tmp_path))
    [done] = again.sweep()
    assert (done.policy, sorted(done.done)) == (ReclaimPolicy.UNPIN, NEW)
    assert runtime.pinned == set(OLD)  # Retain: still pinned
    assert again.sweep() == []
    # the policy of an ImageUnlock that is gone and left nothing here is not kept for ever
    assert set(again.policies) == {"ns/kept"}
    runtime.remove(OLD)
    assert again.sweep() == [] and again.policies == {}
    assert Reclaimer(runtime, kube, "edge-1", reclaimer.entry, directory=str(tmp_path)).policies == {}


def test_the_sweep_reclaims_a_live_ones_earlier_version_only_once_it_is_ready(node):
    runtime, kube, reclaimer, load = node
    load(OWNER, OLD + NEW)
    kube.objects = [body(ready=False)]  # version 2 not Ready here yet: version 1 stays runnable
    assert reclaimer.sweep() == []
    assert set(OLD) <= runtime.pinned
    kube.objects = [body()]
    [done] = reclaimer.sweep()
    assert sorted(done.done) == OLD and runtime.pinned == set(NEW)
    assert kube.entry_writes == []  # the entry is the reconciler's: the Event says it
    assert [e.message for e in kube.events] == ["node edge-1: unpinned 2 image(s) of 1.0"]


def test_a_sweep_lists_the_api_only_when_the_watched_objects_suggest_a_reclaim(node, tmp_path):
    runtime, kube, _, load = node
    load(OWNER, NEW)
    load("ns/kept", OLD)
    kube.objects = [body(), body(name="kept", version="1.0", reclaimPolicy="Retain")]
    watched = list(kube.objects)
    reclaimer = Reclaimer(
        runtime,
        kube,
        "edge-1",
        lambda b: NodeAgent(kube, "edge-1", "fake").entry(b),
        directory=str(tmp_path),
        known=lambda: watched,
    )
    assert reclaimer.sweep() == [] and kube.lists == 0  # every record wanted by its owner: no request
    watched.pop()  # "kept" deleted (Retain): one LIST confirms, nothing is touched, and that is settled
    kube.objects = [body()]
    reclaimer.seen(body(name="kept", version="1.0", reclaimPolicy="Retain"))
    assert reclaimer.sweep() == [] and kube.lists == 1 and runtime.pinned == set(OLD + NEW)
    assert reclaimer.sweep() == [] and kube.lists == 1
    watched[0] = body(version="3.0", generation=3)  # an upgrade seen, not yet Ready here: listed, kept
    kube.objects = [body(version="3.0", generation=3, ready=False)]
    assert reclaimer.sweep() == [] and kube.lists == 2 and runtime.pinned == set(OLD + NEW)


def test_no_list_no_reclaim(node):
    runtime, kube, reclaimer, load = node
    load(OWNER, OLD)
    kube.list_error = KubernetesUnavailableError("API server away")
    with pytest.raises(KubernetesUnavailableError):
        reclaimer.sweep()
    assert runtime.pinned == set(OLD)


# -- through the reconciler: after Ready, never before ---------------------------------------

API = "https://api.example.test"
FRAGMENT = b"the-key-fragment"


def test_an_upgrade_reclaims_the_earlier_version_only_once_the_new_one_is_ready(tmp_path, monkeypatch):
    refs = ["azaion/flights:2.0", "azaion/autopilot:2.0"]
    plain = build(refs)
    archive = tmp_path / "images.enc"
    archive.write_bytes(b"".join(encrypt_stream([plain], FRAGMENT)))
    runtime, kube = FakeRuntime(), FakeKubernetesApi()
    kube.add_secret("ns", "creds", Credentials("edge@example.test", "pw"))
    keys = [FakeKeyClient(FRAGMENT, login_error=AuthenticationError("wrong password"))]
    monkeypatch.setattr(resource_api, "ResourceApiClient", lambda url, credentials, settings: keys[0].open(credentials))
    agent = NodeAgent(kube, "edge-1", "docker")
    config = AgentConfig(archive_roots=(str(tmp_path),), api_url_allowlist=(API,), progress_interval=0.0)
    reclaimer = Reclaimer(runtime, kube, "edge-1", agent.entry, directory=str(tmp_path / "state"))
    reconciler = Reconciler(config, runtime, kube, agent, reclaimer=reclaimer)
    for ref in OLD:  # version 1, loaded earlier for this ImageUnlock
        runtime.add({ref: "sha256:old-" + ref})
        runtime.owners[ref] = (OWNER, "sha256:old-" + ref)
        runtime.pinned.add(ref)

    def current() -> dict[str, Any]:
        obj = {
            "metadata": {"namespace": "ns", "name": "iu", "uid": "u", "generation": 2, "creationTimestamp": "x"},
            "spec": {
                "archivePath": str(archive),
                "version": "2.0",
                "images": ["azaion/flights", "azaion/autopilot"],
                "resourceApi": {"url": API, "credentialsSecretRef": {"name": "creds"}},
            },
            "status": kube.status("ns", "iu"),
        }
        kube.objects = [obj]
        return obj

    assert reconciler.reconcile(current()).verdict is Verdict.STALLED  # the upgrade failed
    assert runtime.pinned == set(OLD)  # the old version stays runnable

    keys[0] = FakeKeyClient(FRAGMENT)  # the password corrected
    assert reconciler.reconcile(current()).verdict is Verdict.READY
    assert runtime.pinned == {normalize_ref(r) for r in refs}  # new pinned, old unpinned
    assert set(runtime.owned_refs()) >= set(records(OWNER, [normalize_ref(r) for r in refs]))  # loads are ours
    entry = next(e for e in kube.status("ns", "iu")["nodes"] if e["name"] == "edge-1")
    assert entry["phase"] == "Ready" and sorted(entry["reclaimed"]["refs"]) == OLD
    assert ("Reclaimed", "node edge-1: unpinned 2 image(s) of 1.0") in [(e.reason, e.message) for e in kube.events]


def test_a_rollback_that_finds_the_old_version_present_pins_it_again(tmp_path, monkeypatch):
    """Version 1 was unpinned by the upgrade to 2 but is still on the node: setting 1 back
    finds it (the node verified that very archive: no key request) and pins it again."""
    refs = ["azaion/flights:1.0"]
    plain = build(refs)
    archive = tmp_path / "images.enc"
    archive.write_bytes(b"".join(encrypt_stream([plain], FRAGMENT)))
    runtime, kube = FakeRuntime(), FakeKubernetesApi()
    kube.add_secret("ns", "creds", Credentials("edge@example.test", "pw"))
    monkeypatch.setattr(
        resource_api, "ResourceApiClient", lambda url, credentials, settings: FakeKeyClient(FRAGMENT).open(credentials)
    )
    agent = NodeAgent(kube, "edge-1", "docker")
    config = AgentConfig(archive_roots=(str(tmp_path),), api_url_allowlist=(API,), progress_interval=0.0)
    reclaimer = Reclaimer(runtime, kube, "edge-1", agent.entry, directory=str(tmp_path / "state"))
    reconciler = Reconciler(config, runtime, kube, agent, reclaimer=reclaimer)

    def at(generation: int) -> dict[str, Any]:
        obj = {
            "metadata": {"namespace": "ns", "name": "iu", "uid": "u", "generation": generation},
            "spec": {
                "archivePath": str(archive),
                "version": "1.0",
                "images": ["azaion/flights"],
                "resourceApi": {"url": API, "credentialsSecretRef": {"name": "creds"}},
            },
            "status": kube.status("ns", "iu"),
        }
        kube.objects = [obj]
        return obj

    assert reconciler.reconcile(at(1)).verdict is Verdict.READY
    runtime.unpin(["docker.io/azaion/flights:1.0"])  # what the upgrade to 2 did
    loads = len(runtime.loads)
    assert reconciler.reconcile(at(3)).verdict is Verdict.READY  # the rollback: a new generation
    assert len(runtime.loads) == loads  # found, not loaded again
    assert runtime.pinned == {"docker.io/azaion/flights:1.0"}


# -- the recorded policies: what is read back from the state dir -------------------------------


def test_a_fifo_as_the_policies_file_does_not_hang_the_agent_at_start(node, tmp_path):
    runtime, kube, reclaimer, _ = node
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "reclaim-policies.json")
    built: list[Reclaimer] = []
    thread = threading.Thread(
        target=lambda: built.append(Reclaimer(runtime, kube, "edge-1", reclaimer.entry, directory=str(fifo))),
        daemon=True,
    )
    thread.start()
    thread.join(3)
    if thread.is_alive():  # let the thread go
        os.close(os.open(fifo / "reclaim-policies.json", os.O_WRONLY | os.O_NONBLOCK))
    assert built and built[0].policies == {}


def test_recorded_policies_of_a_malformed_owner_or_policy_are_dropped(node, tmp_path):
    runtime, kube, reclaimer, _ = node
    reclaimer.seen(body(name="kept", reclaimPolicy="Retain"))
    path = tmp_path / "reclaim-policies.json"
    recorded = json.loads(path.read_text())
    recorded.update({"a/b/c/../kube-system": "Delete", "kube-system/x/y": "Delete", "ns/odd": ["Delete"]})
    path.write_text(json.dumps(recorded))
    again = Reclaimer(runtime, kube, "edge-1", reclaimer.entry, directory=str(tmp_path))
    assert again.policies == {"ns/kept": ReclaimPolicy.RETAIN}
    path.chmod(0o666)  # anyone may write it: not read at all
    assert Reclaimer(runtime, kube, "edge-1", reclaimer.entry, directory=str(tmp_path)).policies == {}
