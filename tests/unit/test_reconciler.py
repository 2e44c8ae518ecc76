"""One reconcile of one ImageUnlock (Reconciler.reconcile) with a fake runtime, key client and
Kubernetes API: the entry of this node each outcome leaves behind (applied by a NodeAgent as
the agent does), the verdict, backoff, events, claims.

The seam for the key client: the resource API key source's ``ResourceApiClient`` is replaced
with a factory that hands out the world's FakeKeyClient (the key source itself is the real one,
built from the spec through the key-source registry).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imageunlock.agent.node import NodeAgent
from imageunlock.agent.reconciler import REQUESTED_AT, Reconciler, Verdict
from imageunlock.app.config import AgentConfig
from imageunlock.engine.crypto import encrypt_stream
from imageunlock.engine.keys import resource_api
from imageunlock.engine.models import Credentials
from imageunlock.errors import ApiUnavailableError, AuthenticationError, KubernetesUnavailableError
from imageunlock.kube import conditions as st

from ..support.fakes import FakeKeyClient, FakeKubernetesApi, FakeRuntime
from ..support.savetar import build, config_ids

API = "https://api.example.test"
NS, NAME = "ns", "iu"
NODE = "edge-1"
VERSION = "2.0"
IMAGES = ["azaion/flights", "azaion/autopilot"]
REFS = [f"{name}:{VERSION}" for name in IMAGES]
FRAGMENT = b"the-key-fragment"
CREDS = Credentials("edge@example.test", "pw")


@dataclass
class World:
    root: Path
    runtime: FakeRuntime
    kube: FakeKubernetesApi
    key: FakeKeyClient  # replace it to script other answers: the factory reads it per unlock
    archive: Path
    ids: dict[str, str]
    urls: list[str] = field(default_factory=list)  # resource API each key client was opened for
    others: list[dict[str, Any]] = field(default_factory=list)  # other ImageUnlocks, for claims
    pressure: bool = False  # the Node's DiskPressure condition
    reconciler: Reconciler = field(init=False)

    def __post_init__(self) -> None:
        self.configure()

    def configure(self, **settings: Any) -> None:
        config = AgentConfig(
            archive_roots=(str(self.root),), api_url_allowlist=(API,), progress_interval=0.0, **settings
        )
        agent = NodeAgent(self.kube, NODE, "docker")
        # the retry delay's ceiling, without its jitter (tests/unit/test_status.py covers that)
        self.reconciler = Reconciler(
            config,
            self.runtime,
            self.kube,
            agent,
            others=lambda: list(self.others),
            disk_pressure=lambda: self.pressure,
            jitter=st.backoff,
        )

    def open_key_client(self, url: str, credentials: Credentials, _settings: object) -> FakeKeyClient:
        """Stands in for ``ResourceApiClient(url, credentials, settings)``."""
        self.urls.append(url)
        return self.key.open(credentials)

    def body(self, generation: int = 1, **spec: Any) -> dict[str, Any]:
        """The object as the API server has it now: its status is whatever was applied so far."""
        return make_body(self.archive, generation, status=self.kube.status(NS, NAME), **spec)

    def reconcile(self, generation: int = 1, attempt: int = 0, **spec: Any):
        return self.reconciler.reconcile(self.body(generation, **spec), attempt=attempt)

    @property
    def entry(self) -> dict[str, Any]:
        """This node's entry as the API server holds it."""
        return next((e for e in self.kube.status(NS, NAME).get("nodes") or () if e["name"] == NODE), {})

    @property
    def writes(self) -> list[dict[str, Any] | None]:
        """Every entry applied, in order."""
        return [entry for _key, _node, entry in self.kube.entry_writes]

    @property
    def events(self) -> list[tuple[str, str]]:
        return [(e.type, e.reason) for e in self.kube.events]


def make_body(
    archive: Path,
    generation: int = 1,
    status: dict | None = None,
    name: str = NAME,
    created: str = "2026-01-02T00:00:00Z",
    **spec: Any,
) -> dict[str, Any]:
    return {
        "apiVersion": "loader.azaion.com/v1alpha1",
        "kind": "ImageUnlock",
        "metadata": {
            "namespace": NS,
            "name": name,
            "uid": f"uid-{name}",
            "generation": generation,
            "creationTimestamp": created,
        },
        "spec": {
            "archivePath": str(archive),
            "version": VERSION,
            "images": IMAGES,
            "resourceApi": {"url": API, "credentialsSecretRef": {"name": "creds"}},
            **spec,
        },
        "status": status or {},
    }


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    plain = build(REFS)
    archive = tmp_path / "images.enc"
    archive.write_bytes(b"".join(encrypt_stream([plain], FRAGMENT)))
    kube = FakeKubernetesApi()
    kube.add_secret(NS, "creds", CREDS)
    w = World(tmp_path, FakeRuntime(), kube, FakeKeyClient(FRAGMENT), archive, config_ids(plain))
    monkeypatch.setattr(resource_api, "ResourceApiClient", w.open_key_client)
    return w


def state(entry: dict[str, Any]) -> tuple[str, str]:
    """An entry's phase and reason (it keeps no conditions: these say which one holds)."""
    return entry["phase"], entry["reason"]


# -- Ready ---------------------------------------------------------------------------------


def test_a_first_reconcile_unlocks_and_leaves_a_complete_ready_status(world):
    outcome = world.reconcile()
    assert outcome.verdict is Verdict.READY
    entry = world.entry
    assert state(entry) == ("Ready", "Unlocked") and entry["observedGeneration"] == 1
    assert (entry["name"], entry["runtime"]) == (NODE, "docker")
    assert entry["images"] == [{"name": ref, "id": world.ids[ref]} for ref in REFS]
    assert entry["message"] == f"{len(REFS)} image(s) loaded and verified"
    assert "progress" not in entry  # done: the summary says 100 %
    assert entry["lastUnlockTime"].endswith("Z") and entry["lastVerifiedTime"].endswith("Z")
    # the credentials came from the spec's Secret and went to the spec's API
    assert world.kube.credential_reads == [(NS, "creds")] and world.urls == [API]
    assert world.key.opened == [CREDS]


def test_progress_is_written_while_unlocking(world):
    world.reconcile()
    phases = [entry["phase"] for entry in world.writes if entry]
    assert phases[0] == "Authenticating" and phases[-1] == "Ready"  # no write before the work starts
    assert {"Authenticating", "FetchingKey", "Loading", "Verifying"} <= set(phases)
    assert all("observedGeneration" not in entry for entry in world.writes[:-1] if entry)
    size = world.archive.stat().st_size
    loading = [entry["progress"] for entry in world.writes if entry and entry["phase"] == "Loading"]
    assert loading[-1] == {"bytesDone": size, "bytesTotal": size, "percent": 100}


def test_an_unlock_posts_one_unlocking_and_one_unlocked_event(world):
    world.reconcile()
    assert world.events == [("Normal", "Unlocking"), ("Normal", "Unlocked")]
    assert f"{len(REFS)} image(s) loaded and verified at version {VERSION}" in world.kube.events[-1].message


def test_an_unlock_with_a_digest_check_also_posts_one_unlocking_event(world):
    digest = hashlib.sha256(world.archive.read_bytes()).hexdigest()
    assert world.reconcile(archiveSha256=digest).verdict is Verdict.READY
    assert world.events == [("Normal", "Unlocking"), ("Normal", "Unlocked")]


def test_a_ready_object_stays_ready_by_the_fast_path_without_login_or_event(world):
    world.reconcile()
    writes, events = len(world.writes), len(world.kube.events)
    outcome = world.reconcile()
    assert outcome.verdict is Verdict.READY
    assert world.key.opened == [CREDS]  # no second login
    assert len(world.runtime.loads) == 1
    assert state(world.entry) == ("Ready", "AlreadyPresent")
    assert len(world.writes) == writes + 1  # only the final status, no progress
    assert len(world.kube.events) == events  # nothing changed: no event


def test_recovering_by_the_fast_path_posts_one_already_present_event(world):
    world.reconcile()
    world.runtime.unreachable = True
    assert world.reconcile().verdict is Verdict.RETRY
    world.runtime.unreachable = False
    assert world.reconcile(attempt=1).verdict is Verdict.READY
    assert world.events[-2:] == [("Warning", "RuntimeUnavailable"), ("Normal", "AlreadyPresent")]
    assert world.entry["phase"] == "Ready" and len(world.runtime.loads) == 1


def test_a_new_generation_of_the_same_archive_file_is_served_from_what_this_node_verified(world):
    """Issue 22, item 3: the node trusts IDs it verified itself from the very same file."""
    world.reconcile(generation=1)
    assert world.reconcile(generation=2).verdict is Verdict.READY
    assert len(world.runtime.loads) == 1 and world.key.fragments == 1
    assert world.entry["observedGeneration"] == 2


def test_a_rewritten_archive_file_is_not_served_from_what_was_verified_before(world):
    world.reconcile(generation=1)
    world.archive.write_bytes(world.archive.read_bytes())  # same bytes, a new write: a new identity
    assert world.reconcile(generation=2).verdict is Verdict.READY
    assert len(world.runtime.loads) == 2  # unlocked again


def test_another_imageunlock_naming_the_same_file_needs_no_key_request_nor_event(world):
    world.reconcile()
    writes, events = len(world.writes), len(world.kube.events)
    other = make_body(world.archive, name="another", status={})
    assert world.reconciler.reconcile(other).verdict is Verdict.READY
    assert world.key.fragments == 1 and len(world.runtime.loads) == 1
    assert len(world.writes) == writes + 1 and len(world.kube.events) == events  # one write: Ready


def test_what_the_node_verified_is_not_trusted_against_a_digest_it_never_checked(world):
    world.reconcile()
    digest = hashlib.sha256(world.archive.read_bytes()).hexdigest()
    other = make_body(world.archive, name="another", status={}, archiveSha256=digest)
    assert world.reconciler.reconcile(other).verdict is Verdict.READY
    assert world.key.fragments == 2  # checked and unlocked: the first unlock had no digest to vouch for
    third = make_body(world.archive, name="third", status={}, archiveSha256=digest)
    assert world.reconciler.reconcile(third).verdict is Verdict.READY
    assert world.key.fragments == 2  # now the node knows the file's digest


# -- Stalled -------------------------------------------------------------------------------


def test_a_wrong_key_stalls_with_images_and_progress_removed(world):
    world.reconcile(generation=1)  # Ready, with images and progress
    world.archive.write_bytes(world.archive.read_bytes())  # a new file: not served from what was verified
    world.key.fragment = b"some-other-fragment"
    outcome = world.reconcile(generation=2)
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "ArchiveInvalid")
    entry = world.entry
    assert state(entry) == ("Failed", "ArchiveInvalid") and entry["observedGeneration"] == 2
    assert "images" not in entry and "progress" not in entry  # generation 1's: they do not hold for 2
    assert world.events[-1] == ("Warning", "ArchiveInvalid")
    assert [e.reason for e in world.kube.events].count("ArchiveInvalid") == 1


def test_images_missing_after_the_load_stall_naming_them(world):
    world.runtime.drop_after_load = {REFS[1]}
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "ImagesMissing")
    assert state(world.entry) == ("Failed", "ImagesMissing") and f"missing: {REFS[1]}" in world.entry["message"]
    assert "images" not in world.entry  # none is vouched for


@pytest.mark.parametrize(
    "spec",
    [
        {"resourceApi": {"url": "https://elsewhere.example.test", "credentialsSecretRef": {"name": "creds"}}},
        {"version": "not a tag"},
        {"archivePath": "/somewhere/else.enc"},  # outside the archive roots
    ],
)
def test_an_invalid_spec_stalls_without_touching_credentials(world, spec):
    outcome = world.reconcile(**spec)
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "InvalidConfiguration")
    assert world.entry["phase"] == "Failed" and world.entry["observedGeneration"] == 1
    assert world.kube.credential_reads == [] and world.key.opened == [] and world.runtime.loads == []


def test_a_missing_secret_stalls(world):
    world.kube.secrets.clear()
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "InvalidConfiguration")
    assert world.entry["message"] == outcome.message and f"{NS}/creds" in outcome.message
    assert world.key.opened == [] and world.runtime.loads == []


def test_rejected_credentials_stall_without_a_key_request(world):
    world.key = FakeKeyClient(FRAGMENT, login_error=AuthenticationError("the resource API refused the credentials"))
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason, outcome.delay) == (Verdict.STALLED, "AuthenticationFailed", 0.0)
    assert world.key.logins == 1 and world.key.fragments == 0
    assert state(world.entry) == ("Failed", "AuthenticationFailed")


def _records(caplog) -> list[tuple[int, str, str, str | None]]:
    return [
        (r.levelno, r.getMessage(), f"{r.k8s_ref['namespace']}/{r.k8s_ref['name']}", getattr(r, "reason", None))
        for r in caplog.records
        if r.name == "imageunlock.agent.reconciler" and hasattr(r, "k8s_ref")
    ]


def test_a_failure_is_logged_once_at_warning_with_its_object_and_reason(world, caplog):
    """Issue 21: a wrong password or a missing archive was in no log line; a quiet re-check
    that fails the same way again logs nothing more."""
    caplog.set_level(logging.INFO)
    world.key = FakeKeyClient(FRAGMENT, login_error=AuthenticationError("the resource API refused the credentials"))
    world.reconcile()
    _recheck(world, "req-1")
    assert [(level, obj, reason) for level, _, obj, reason in _records(caplog)] == [
        (logging.INFO, f"{NS}/{NAME}", "Unlocking"),
        (logging.WARNING, f"{NS}/{NAME}", "AuthenticationFailed"),
    ]


def test_ready_is_logged_once_at_info_and_a_fast_path_that_changes_nothing_not_at_all(world, caplog):
    caplog.set_level(logging.INFO)
    world.reconcile()
    world.reconcile()  # Ready again by the fast path: no state change
    assert [(level, reason) for level, _, _, reason in _records(caplog)] == [
        (logging.INFO, "Unlocking"),
        (logging.INFO, "Unlocked"),
    ]
    assert CREDS.password not in caplog.text


# -- transient failures --------------------------------------------------------------------


def test_a_transient_failure_is_retried_with_attempt_and_delay_in_the_status(world):
    world.configure(retry_base=5.0, retry_max=300.0)
    world.runtime.unreachable = True
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason, outcome.delay) == (Verdict.RETRY, "RuntimeUnavailable", 5.0)
    entry = world.entry
    assert entry["message"].startswith("attempt 1 failed: ") and entry["message"].endswith("retrying in 5s")
    assert "observedGeneration" not in entry  # this generation is not finished
    assert state(entry) == ("Pending", "RuntimeUnavailable")  # a working phase: Reconciling
    assert world.events[-1] == ("Warning", "RuntimeUnavailable")
    assert world.kube.events[-1].message == f"node {NODE}: fake runtime is not reachable"  # repeats aggregate


def test_under_disk_pressure_no_import_starts_and_the_node_waits_reconciling(world):
    """Issue 20, item 2: the Node's DiskPressure condition holds the import before any login
    or key request (NodeDiskPressure, a working phase: Reconciling, not Stalled)."""
    world.configure(retry_base=5.0, retry_max=300.0)
    world.pressure = True
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason, outcome.delay) == (Verdict.RETRY, "NodeDiskPressure", 5.0)
    assert state(world.entry) == ("Pending", "NodeDiskPressure") and "observedGeneration" not in world.entry
    assert f"node {NODE} reports DiskPressure" in world.entry["message"]
    assert world.key.opened == [] and world.kube.credential_reads == [] and world.runtime.loads == []
    assert world.events == [("Warning", "NodeDiskPressure")]
    world.pressure = False  # cleared: the import goes ahead
    assert world.reconcile(attempt=1).verdict is Verdict.READY and len(world.runtime.loads) == 1


def test_under_disk_pressure_images_already_there_stay_ready(world):
    """The fast path needs no import: a Ready node stays Ready while the disk is under pressure."""
    world.reconcile()
    world.pressure = True
    assert world.reconcile().verdict is Verdict.READY
    assert state(world.entry) == ("Ready", "AlreadyPresent") and len(world.runtime.loads) == 1


def test_a_transient_failure_of_a_new_generation_leaves_the_last_observed_generation(world):
    world.reconcile(generation=1)
    world.runtime.unreachable = True
    assert world.reconcile(generation=2).verdict is Verdict.RETRY
    assert world.entry["observedGeneration"] == 1  # kstatus: generation 2 is still in progress
    assert state(world.entry) == ("Pending", "RuntimeUnavailable")


def test_the_retry_status_names_the_phase_that_failed(world):
    world.key = FakeKeyClient(FRAGMENT, key_error=ApiUnavailableError("resource API answered 503"))
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "ResourceApiUnavailable")
    assert world.entry["phase"] == "FetchingKey" and "503" in world.entry["message"]


def test_backoff_doubles_from_retry_base_up_to_retry_max(world):
    world.configure(retry_base=2.0, retry_max=10.0)
    world.runtime.unreachable = True
    delays = [world.reconcile(attempt=attempt).delay for attempt in range(6)]
    assert delays == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert world.entry["message"].startswith("attempt 6 failed: ")
    assert world.entry["message"].endswith("retrying in 10s")


def test_by_default_a_retry_waits_a_jittered_delay_within_the_backoff(world):
    """Issue 21: the agent's own retry delays are drawn (full jitter), not the bare backoff."""
    agent = NodeAgent(world.kube, NODE, "docker")
    config = AgentConfig(archive_roots=(str(world.root),), api_url_allowlist=(API,), retry_base=8.0, retry_max=60.0)
    world.reconciler = Reconciler(config, world.runtime, world.kube, agent)
    world.runtime.unreachable = True
    delays = [world.reconcile(attempt=2).delay for _ in range(20)]
    assert all(0.0 <= d <= 32.0 for d in delays) and len(set(delays)) > 1
    assert world.entry["message"].endswith(f"retrying in {delays[-1]:.0f}s")


def test_an_unexpected_exception_is_an_internal_error_that_says_little(world):
    world.runtime.load_error = RuntimeError("stack details with a token=abc123")
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "InternalError")
    assert "RuntimeError" in outcome.message and "abc123" not in outcome.message
    assert "abc123" not in world.entry["message"]
    assert all("abc123" not in e.message for e in world.kube.events)


# -- claims --------------------------------------------------------------------------------


def holder(archive: Path, name: str, created: str, images: list[str] = IMAGES, **spec: Any) -> dict[str, Any]:
    """Another ImageUnlock that is Ready on this node with the refs it verified: it holds them."""
    verified = [{"name": f"{image}:{VERSION}", "id": "sha256:" + "d" * 64} for image in images]
    status = {"nodes": [{"name": NODE, "phase": "Ready", "observedGeneration": 1, "images": verified}]}
    other = make_body(archive, name=name, created=created, status=status, images=images, **spec)
    other["metadata"]["resourceVersion"] = f"{name}-1"
    return other


def test_an_earlier_imageunlock_of_the_same_ref_from_another_archive_is_a_ref_conflict(world, tmp_path):
    world.others.append(holder(tmp_path / "other.enc", "first", "2026-01-01T00:00:00Z", images=[IMAGES[0]]))
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "RefConflict")
    assert "first" in outcome.message and REFS[0] in outcome.message
    assert state(world.entry) == ("Failed", "RefConflict")
    assert world.kube.credential_reads == [] and world.runtime.loads == []


def test_no_conflict_with_a_claim_from_the_same_archive(world, tmp_path):
    world.others.append(holder(tmp_path / "images.enc", "same-archive", "2026-01-01T00:00:00Z"))
    assert world.reconcile().verdict is Verdict.READY


def test_a_later_holder_conflicts_only_with_an_earlier_object_that_does_not_hold_the_ref(world, tmp_path):
    """The holder keeps its refs whatever the requester's age (review of issue 18); when both
    hold them, the earlier one keeps them."""
    later = holder(tmp_path / "other.enc", "later", "2026-01-03T00:00:00Z")
    world.others.append(later)
    assert world.reconcile().reason == "RefConflict"  # we hold nothing yet: the holder keeps it
    world.others.clear()
    assert world.reconcile(generation=2).verdict is Verdict.READY  # now we hold them
    world.others.append(later)
    assert world.reconcile(generation=2).verdict is Verdict.READY  # both hold: we were first


def test_an_invalid_other_imageunlock_claims_nothing(world, tmp_path):
    world.others.append(holder(tmp_path / "other.enc", "broken", "2026-01-01T00:00:00Z", version="not a tag"))
    assert world.reconcile().verdict is Verdict.READY


def test_a_status_write_refused_by_the_api_server_is_a_retry_not_a_crash(world):
    """Found while writing these tests: a failed status write escaped reconcile(), so the resync
    loop never scheduled the object and unlocked it again on every tick."""
    world.kube.patch_error = KubernetesUnavailableError("writing status failed (HTTP 403)")
    outcome = world.reconcile()
    assert outcome.verdict is Verdict.RETRY and outcome.delay > 0


def _recheck(world: World, requested: str):
    body = world.body()
    body["metadata"]["annotations"] = {REQUESTED_AT: requested}
    return world.reconciler.reconcile(body)


def test_a_recheck_that_fails_the_same_way_writes_only_the_request_and_posts_no_event(world):
    """Issue 18, item 3: a requested re-check of a Stalled object that cannot succeed costs
    one write (lastHandledRequestedAt) and no event per node — not a round of progress
    writes, a Stalled write and a Warning each time."""
    world.key = FakeKeyClient(FRAGMENT, login_error=AuthenticationError("the resource API refused the credentials"))
    assert world.reconcile().verdict is Verdict.STALLED
    writes, events, stalled = len(world.writes), list(world.events), dict(world.entry)
    for n in range(3):
        outcome = _recheck(world, f"req-{n}")
        assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "AuthenticationFailed")
        assert world.writes[-1] == {**stalled, "lastHandledRequestedAt": f"req-{n}"}  # nothing else changed
    assert len(world.writes) == writes + 3 and world.events == events
    assert world.key.logins == 4


def test_a_recheck_with_another_outcome_is_written_and_announced(world):
    world.key = FakeKeyClient(FRAGMENT, login_error=AuthenticationError("the resource API refused the credentials"))
    world.reconcile()
    world.key = FakeKeyClient(FRAGMENT)  # the credentials were fixed
    assert _recheck(world, "req-1").verdict is Verdict.READY
    assert world.entry["phase"] == "Ready" and world.entry["lastHandledRequestedAt"] == "req-1"
    assert ("Normal", "Unlocked") in world.events


def test_per_namespace_archive_directories_confine_a_namespace_to_its_own(world):
    """Issue 18, item 6: with IMAGEUNLOCK_ARCHIVE_PER_NAMESPACE an ImageUnlock can name only
    files under <root>/<its namespace>/: another namespace's archive (or the root's own)
    is refused before its existence, size or digest can be learnt, and no Secret is read."""
    world.configure(archive_per_namespace=True)
    (world.root / "other-team").mkdir()
    theirs = world.root / "other-team" / "images.enc"
    theirs.write_bytes(world.archive.read_bytes())
    for path in (theirs, world.archive, world.root / NS / ".." / "other-team" / "images.enc"):
        outcome = world.reconcile(archivePath=str(path))
        assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "InvalidConfiguration"), path
        assert str(world.root / NS) in outcome.message
    assert world.kube.credential_reads == [] and world.key.opened == []
    (world.root / NS).mkdir()
    ours = world.root / NS / "images.enc"
    ours.write_bytes(world.archive.read_bytes())
    assert world.reconcile(archivePath=str(ours)).verdict is Verdict.READY


def test_waiting_for_another_unlock_of_the_same_archive_is_no_failure(world):
    """Issue 22, item 3: a second ImageUnlock naming an archive another is unlocking waits for
    it (no ArchiveBusy, no back-off, no event) and then finds its images verified."""
    import threading

    loading, release = threading.Event(), threading.Event()
    original = world.runtime.load

    def slow_load(chunks, refs=(), owner=None):
        loading.set()
        assert release.wait(10)
        return original(chunks, refs, owner)

    world.runtime.load = slow_load
    first = threading.Thread(target=world.reconcile)
    first.start()
    assert loading.wait(10)
    outcomes = []
    second = threading.Thread(
        target=lambda: outcomes.append(world.reconciler.reconcile(make_body(world.archive, name="second", status={})))
    )
    second.start()
    second.join(1.0)
    assert second.is_alive()  # waiting for the archive, not failed
    release.set()
    first.join(10)
    second.join(10)
    assert [o.verdict for o in outcomes] == [Verdict.READY]
    assert len(world.runtime.loads) == 1 and world.key.fragments == 1
    assert not any(kind == "Warning" for kind, _ in world.events)


def test_what_the_node_verified_for_one_namespace_does_not_make_another_ready_without_credentials(world):
    """Second review of issue 18 (medium): a tenant with no Secret named another tenant's
    archive and was made Ready from the node's memory, holding that tenant's refs."""
    world.reconcile()
    other = make_body(world.archive, name="squatter", status={})
    other["metadata"]["namespace"] = "team-b"
    outcome = world.reconciler.reconcile(other)
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "InvalidConfiguration")  # no Secret there
    assert world.key.fragments == 1 and len(world.runtime.loads) == 1


def test_with_image_owners_a_namespace_unlocks_only_its_own_names(world):
    """Second review of issue 18 (high): image names are node-wide; a tenant with an archive
    of its own could take a name another tenant uses (its next version, say). With
    IMAGEUNLOCK_IMAGE_OWNERS each namespace may unlock only the names given to it."""
    world.configure(image_owners={"team-b": ("teamb/",), NS: ("azaion/",)})
    squat = make_body(world.archive, name="squat", status={})
    squat["metadata"]["namespace"] = "team-b"
    outcome = world.reconciler.reconcile(squat)
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "InvalidConfiguration")
    assert "IMAGEUNLOCK_IMAGE_OWNERS" in outcome.message and "azaion/flights" in outcome.message
    assert world.kube.credential_reads == [] and world.runtime.loads == []
    assert world.reconcile().verdict is Verdict.READY  # the owner's own names


# -- spec.keySealing TPM (issue 23; the real TPM: tests/tpm, tests/e2e/test_sealed_key.py) --


class _FakeTpm:
    def __init__(self) -> None:
        self.vault: dict[bytes, bytes] = {}
        self.tctis: list[str] = []
        self.wrong = False

    def seal(self, key: bytes, *, tcti: str, pcrs: Any, identity: str) -> bytes:
        from imageunlock.engine.keys import tpm

        self.tctis.append(tcti)
        blob = tpm._pack(tpm.BlobInfo(identity, tuple(pcrs)), hashlib.sha256(key).digest(), b"priv")
        self.vault[blob] = key
        return blob

    def unseal(self, blob: bytes, *, tcti: str, identity: str) -> bytes:
        self.tctis.append(tcti)
        return b"\0" * 32 if self.wrong else self.vault[blob]


@pytest.fixture
def sealing(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _FakeTpm:
    from imageunlock.engine.keys import tpm

    fake = _FakeTpm()
    monkeypatch.setattr(tpm, "seal", fake.seal)
    monkeypatch.setattr(tpm, "unseal", fake.unseal)
    monkeypatch.setenv("IMAGEUNLOCK_STATE_DIR", str(tmp_path / "state"))
    world.configure(tpm_tcti="swtpm:host=127.0.0.1,port=2321")
    return fake


def test_key_sealing_tpm_repairs_from_the_sealed_key_with_the_api_down(world, sealing, tmp_path):
    assert world.reconcile(keySealing="TPM", keySealingPCRs=[7]).verdict is Verdict.READY
    [blob] = (tmp_path / "state" / "sealed-keys").iterdir()
    assert sealing.tctis == ["swtpm:host=127.0.0.1,port=2321"]
    world.runtime._images.clear()  # the images are gone
    world.key = FakeKeyClient(FRAGMENT, login_error=ApiUnavailableError("resource API unreachable"))
    assert world.reconcile(keySealing="TPM", keySealingPCRs=[7]).verdict is Verdict.READY
    assert world.key.logins == 0 and world.key.fragments == 0 and len(sealing.tctis) == 2
    assert list((tmp_path / "state" / "sealed-keys").iterdir()) == [blob]


def test_key_sealing_none_seals_nothing(world, sealing, tmp_path):
    assert world.reconcile().verdict is Verdict.READY
    assert sealing.tctis == [] and not (tmp_path / "state").exists()


def test_a_sealed_key_that_does_not_decrypt_stalls_once_and_is_dropped(world, sealing, tmp_path):
    world.reconcile(keySealing="TPM")
    world.runtime._images.clear()
    sealing.wrong = True
    outcome = world.reconcile(keySealing="TPM")
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "ArchiveInvalid")
    assert list((tmp_path / "state" / "sealed-keys").iterdir()) == []
    sealing.wrong = False
    assert world.reconcile(keySealing="TPM").verdict is Verdict.READY  # from the API, sealed again
    assert world.key.fragments == 2 and len(list((tmp_path / "state" / "sealed-keys").iterdir())) == 1
