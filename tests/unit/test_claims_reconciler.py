"""Only an ImageUnlock that holds its refs claims them (review: a Stalled squatter in another
namespace, naming a path that does not exist, stalled everyone created after it)."""

from __future__ import annotations

from types import SimpleNamespace

from imageunlock.agent.node import NodeAgent
from imageunlock.agent.reconciler import Reconciler
from imageunlock.app.config import AgentConfig

API = "https://api.example.test"


def body(namespace, name, created, archive, phase, generation=1, verified=True):
    """An ImageUnlock as this node ("n") reported on it."""
    entry = {"name": "n", "phase": phase, "observedGeneration": generation}
    if verified:
        entry["images"] = [{"name": "azaion/x:1.0", "id": "sha256:" + "a" * 64}]
    return {
        "metadata": {
            "namespace": namespace,
            "name": name,
            "creationTimestamp": created,
            "generation": generation,
            "resourceVersion": f"{name}-{phase}",
        },
        "spec": {
            "archivePath": archive,
            "version": "1.0",
            "images": ["azaion/x"],
            "resourceApi": {"credentialsSecretRef": {"name": "creds"}},
        },
        "status": {"nodes": [entry]},
    }


def reconciler(*others):
    config = AgentConfig(archive_roots=("/var/lib/imageunlock",), default_api_url=API)
    kube = SimpleNamespace()
    return Reconciler(
        config, SimpleNamespace(name="docker"), kube, NodeAgent(kube, "n", "docker"), lambda: list(others)
    )


def conflict_for(mine, *others):
    r = reconciler(*others)
    return r.conflict(mine, r.parse(mine))  # the spec as this node reads it: its runtime resolved


MINE = body("team-b", "mine", "2026-01-02T00:00:00Z", "/var/lib/imageunlock/two.enc", "Pending", verified=False)


def test_a_stalled_squatter_claims_nothing():
    squatter = body("dev", "squat", "2026-01-01T00:00:00Z", "/var/lib/imageunlock/none.enc", "Failed", verified=False)
    assert conflict_for(MINE, squatter) is None


def test_a_ready_owner_with_verified_ids_holds_its_refs():
    owner = body("team-a", "owner", "2026-01-01T00:00:00Z", "/var/lib/imageunlock/one.enc", "Ready")
    error = conflict_for(MINE, owner)
    assert error is not None and error.reason == "RefConflict" and "owner" not in error.message


def test_ready_at_an_older_generation_is_no_claim():
    stale = body("team-a", "owner", "2026-01-01T00:00:00Z", "/var/lib/imageunlock/one.enc", "Ready", generation=2)
    stale["status"]["nodes"][0]["observedGeneration"] = 1
    assert conflict_for(MINE, stale) is None


def test_an_old_object_in_another_namespace_cannot_take_a_held_ref():
    """Review of issue 18 (high), through the reconciler: the requester is older but holds
    nothing; the Ready holder keeps its ref."""
    holder = body("team-a", "owner", "2026-06-01T00:00:00Z", "/var/lib/imageunlock/one.enc", "Ready")
    old = body("team-b", "old", "2026-01-01T00:00:00Z", "/var/lib/imageunlock/two.enc", "Pending", verified=False)
    error = conflict_for(old, holder)
    assert error is not None and error.reason == "RefConflict"
    assert conflict_for(holder, old) is None
