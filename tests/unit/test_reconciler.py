"""One reconcile of one ImageUnlock (Reconciler.reconcile) with a fake runtime, key client and
Kubernetes API: the status each outcome leaves behind, the verdict, backoff, events, claims.

The seam for the key client: the resource API key source's ``ResourceApiClient`` is replaced
with a factory that hands out the world's FakeKeyClient (the key source itself is the real one,
built from the spec through the key-source registry).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imageunlock.agent.reconciler import REQUESTED_AT, Reconciler, Verdict
from imageunlock.app.config import AgentConfig
from imageunlock.engine.crypto import encrypt_stream
from imageunlock.engine.keys import resource_api
from imageunlock.engine.models import Credentials
from imageunlock.errors import ApiUnavailableError, AuthenticationError, KubernetesUnavailableError

from ..support.fakes import FakeKeyClient, FakeKubernetesApi, FakeRuntime
from ..support.savetar import build, config_ids

API = "https://api.example.test"
NS, NAME = "ns", "iu"
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
    reconciler: Reconciler = field(init=False)

    def __post_init__(self) -> None:
        self.configure()

    def configure(self, **settings: Any) -> None:
        config = AgentConfig(
            archive_roots=(str(self.root),), api_url_allowlist=(API,), progress_interval=0.0, **settings
        )
        self.reconciler = Reconciler(config, self.runtime, self.kube, others=lambda: list(self.others))

    def open_key_client(self, url: str, credentials: Credentials, _settings: object) -> FakeKeyClient:
        """Stands in for ``ResourceApiClient(url, credentials, settings)``."""
        self.urls.append(url)
        return self.key.open(credentials)

    def body(self, generation: int = 1, **spec: Any) -> dict[str, Any]:
        """The object as the API server has it now: its status is whatever was patched so far."""
        return make_body(self.archive, generation, status=self.kube.status(NS, NAME), **spec)

    def reconcile(self, generation: int = 1, attempt: int = 0, **spec: Any):
        return self.reconciler.reconcile(self.body(generation, **spec), attempt=attempt)

    @property
    def status(self) -> dict[str, Any]:
        return self.kube.status(NS, NAME)

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


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def generations(status: dict[str, Any]) -> set[int]:
    return {c["observedGeneration"] for c in status["conditions"]}


# -- Ready ---------------------------------------------------------------------------------


def test_a_first_reconcile_unlocks_and_leaves_a_complete_ready_status(world):
    outcome = world.reconcile()
    assert outcome.verdict is Verdict.READY
    status = world.status
    assert status["phase"] == "Ready" and status["observedGeneration"] == 1
    assert status["images"] == [{"name": ref, "id": world.ids[ref], "present": True} for ref in REFS]
    assert conditions(status) == {
        "Ready": ("True", "Unlocked"),
        "Reconciling": ("False", "Succeeded"),
        "Stalled": ("False", "Succeeded"),
    }
    assert generations(status) == {1}
    size = world.archive.stat().st_size
    assert status["progress"] == {"bytesDone": size, "bytesTotal": size, "percent": 100, "text": "100%"}
    assert status["lastUnlockTime"].endswith("Z")
    # the credentials came from the spec's Secret and went to the spec's API
    assert world.kube.credential_reads == [(NS, "creds")] and world.urls == [API]
    assert world.key.opened == [CREDS]


def test_progress_is_written_while_unlocking(world):
    world.reconcile()
    phases = [status.get("phase") for _, status in world.kube.writes]
    assert phases[0] == "Authenticating" and phases[-1] == "Ready"  # no write before the work starts
    assert {"Authenticating", "FetchingKey", "Loading", "Verifying"} <= set(phases)
    assert all("observedGeneration" not in status for _, status in world.kube.writes[:-1])


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
    writes, events = len(world.kube.writes), len(world.kube.events)
    outcome = world.reconcile()
    assert outcome.verdict is Verdict.READY
    assert world.key.opened == [CREDS]  # no second login
    assert len(world.runtime.loads) == 1
    assert conditions(world.status)["Ready"] == ("True", "AlreadyPresent")
    assert len(world.kube.writes) == writes + 1  # only the final status, no progress
    assert len(world.kube.events) == events  # nothing changed: no event


def test_recovering_by_the_fast_path_posts_one_already_present_event(world):
    world.reconcile()
    world.runtime.unreachable = True
    assert world.reconcile().verdict is Verdict.RETRY
    world.runtime.unreachable = False
    assert world.reconcile(attempt=1).verdict is Verdict.READY
    assert world.events[-2:] == [("Warning", "RuntimeUnavailable"), ("Normal", "AlreadyPresent")]
    assert world.status["phase"] == "Ready" and len(world.runtime.loads) == 1


def test_a_new_generation_of_the_same_archive_file_is_served_from_what_this_node_verified(world):
    """Issue 22, item 3: the node trusts IDs it verified itself from the very same file."""
    world.reconcile(generation=1)
    assert world.reconcile(generation=2).verdict is Verdict.READY
    assert len(world.runtime.loads) == 1 and world.key.fragments == 1
    assert world.status["observedGeneration"] == 2 and generations(world.status) == {2}


def test_a_rewritten_archive_file_is_not_served_from_what_was_verified_before(world):
    world.reconcile(generation=1)
    world.archive.write_bytes(world.archive.read_bytes())  # same bytes, a new write: a new identity
    assert world.reconcile(generation=2).verdict is Verdict.READY
    assert len(world.runtime.loads) == 2  # unlocked again


def test_another_imageunlock_naming_the_same_file_needs_no_key_request_nor_event(world):
    world.reconcile()
    writes, events = len(world.kube.writes), len(world.kube.events)
    other = make_body(world.archive, name="another", status={})
    assert world.reconciler.reconcile(other).verdict is Verdict.READY
    assert world.key.fragments == 1 and len(world.runtime.loads) == 1
    assert len(world.kube.writes) == writes + 1 and len(world.kube.events) == events  # one write: Ready


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
    status = world.status
    assert status["phase"] == "Failed" and status["observedGeneration"] == 2
    assert "images" not in status and "progress" not in status  # nulled by the merge patch
    assert conditions(status) == {
        "Ready": ("False", "ArchiveInvalid"),
        "Reconciling": ("False", "ArchiveInvalid"),
        "Stalled": ("True", "ArchiveInvalid"),
    }
    assert generations(status) == {2}
    assert world.events[-1] == ("Warning", "ArchiveInvalid")
    assert [e.reason for e in world.kube.events].count("ArchiveInvalid") == 1


def test_images_missing_after_the_load_are_listed_as_not_present(world):
    world.runtime.drop_after_load = {REFS[1]}
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "ImagesMissing")
    assert world.status["images"] == [{"name": REFS[1], "id": "", "present": False}]


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
    assert world.status["phase"] == "Failed" and world.status["observedGeneration"] == 1
    assert world.kube.credential_reads == [] and world.key.opened == [] and world.runtime.loads == []


def test_a_missing_secret_stalls(world):
    world.kube.secrets.clear()
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "InvalidConfiguration")
    assert world.status["message"] == outcome.message and f"{NS}/creds" in outcome.message
    assert world.key.opened == [] and world.runtime.loads == []


def test_rejected_credentials_stall_without_a_key_request(world):
    world.key = FakeKeyClient(FRAGMENT, login_error=AuthenticationError("the resource API refused the credentials"))
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason, outcome.delay) == (Verdict.STALLED, "AuthenticationFailed", 0.0)
    assert world.key.logins == 1 and world.key.fragments == 0
    assert conditions(world.status)["Stalled"] == ("True", "AuthenticationFailed")


# -- transient failures --------------------------------------------------------------------


def test_a_transient_failure_is_retried_with_attempt_and_delay_in_the_status(world):
    world.configure(retry_base=5.0, retry_max=300.0)
    world.runtime.unreachable = True
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason, outcome.delay) == (Verdict.RETRY, "RuntimeUnavailable", 5.0)
    status = world.status
    assert status["message"].startswith("attempt 1 failed: ") and status["message"].endswith("retrying in 5s")
    assert "observedGeneration" not in status  # this generation is not finished
    assert conditions(status) == {
        "Ready": ("False", "RuntimeUnavailable"),
        "Reconciling": ("True", "RuntimeUnavailable"),
        "Stalled": ("False", "RuntimeUnavailable"),
    }
    assert world.events[-1] == ("Warning", "RuntimeUnavailable")
    assert world.kube.events[-1].message == "fake runtime is not reachable"  # repeats aggregate


def test_a_transient_failure_of_a_new_generation_leaves_the_last_observed_generation(world):
    world.reconcile(generation=1)
    world.runtime.unreachable = True
    assert world.reconcile(generation=2).verdict is Verdict.RETRY
    assert world.status["observedGeneration"] == 1  # kstatus: generation 2 is still in progress
    assert generations(world.status) == {2} and conditions(world.status)["Reconciling"][0] == "True"


def test_the_retry_status_names_the_phase_that_failed(world):
    world.key = FakeKeyClient(FRAGMENT, key_error=ApiUnavailableError("resource API answered 503"))
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "ResourceApiUnavailable")
    assert world.status["phase"] == "FetchingKey" and "503" in world.status["message"]


def test_backoff_doubles_from_retry_base_up_to_retry_max(world):
    world.configure(retry_base=2.0, retry_max=10.0)
    world.runtime.unreachable = True
    delays = [world.reconcile(attempt=attempt).delay for attempt in range(6)]
    assert delays == [2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert world.status["message"].startswith("attempt 6 failed: ")
    assert world.status["message"].endswith("retrying in 10s")


def test_an_unexpected_exception_is_an_internal_error_that_says_little(world):
    world.runtime.load_error = RuntimeError("stack details with a token=abc123")
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "InternalError")
    assert "RuntimeError" in outcome.message and "abc123" not in outcome.message
    assert "abc123" not in world.status["message"]
    assert all("abc123" not in e.message for e in world.kube.events)


# -- claims --------------------------------------------------------------------------------


def holder(archive: Path, name: str, created: str, images: list[str] = IMAGES, **spec: Any) -> dict[str, Any]:
    """Another ImageUnlock that is Ready with the refs it verified: it holds them."""
    verified = [{"name": f"{image}:{VERSION}", "id": "sha256:" + "d" * 64, "present": True} for image in images]
    status = {"phase": "Ready", "observedGeneration": 1, "images": verified}
    other = make_body(archive, name=name, created=created, status=status, images=images, **spec)
    other["metadata"]["resourceVersion"] = f"{name}-1"
    return other


def test_an_earlier_imageunlock_of_the_same_ref_from_another_archive_is_a_ref_conflict(world, tmp_path):
    world.others.append(holder(tmp_path / "other.enc", "first", "2026-01-01T00:00:00Z", images=[IMAGES[0]]))
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "RefConflict")
    assert "first" in outcome.message and REFS[0] in outcome.message
    assert conditions(world.status)["Stalled"] == ("True", "RefConflict")
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
    writes, events, stalled = len(world.kube.writes), list(world.events), dict(world.status)
    for n in range(3):
        outcome = _recheck(world, f"req-{n}")
        assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "AuthenticationFailed")
        assert world.kube.writes[-1][1] == {"lastHandledRequestedAt": f"req-{n}"}
    assert len(world.kube.writes) == writes + 3 and world.events == events
    assert world.key.logins == 4
    assert {k: v for k, v in world.status.items() if k != "lastHandledRequestedAt"} == {
        k: v for k, v in stalled.items() if k != "lastHandledRequestedAt"
    }


def test_a_recheck_with_another_outcome_is_written_and_announced(world):
    world.key = FakeKeyClient(FRAGMENT, login_error=AuthenticationError("the resource API refused the credentials"))
    world.reconcile()
    world.key = FakeKeyClient(FRAGMENT)  # the credentials were fixed
    assert _recheck(world, "req-1").verdict is Verdict.READY
    assert world.status["phase"] == "Ready" and world.status["lastHandledRequestedAt"] == "req-1"
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

    def slow_load(chunks, refs=()):
        loading.set()
        assert release.wait(10)
        return original(chunks, refs)

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
