"""Two ImageUnlocks claiming one ref from different archives (issue 8, item 9)."""

from __future__ import annotations

from imageunlock.agent.claims import Claim, find_conflict


def claim(name, created, archive="/a/images.enc", refs=("azaion/x:1",), runtime="docker", namespace="ns"):
    return Claim(namespace, name, created, runtime, archive, frozenset(refs))


def test_the_later_claim_from_another_archive_is_refused_and_names_the_owner():
    first = claim("first", "2026-01-01T00:00:00Z", "/a/one.enc")
    second = claim("second", "2026-01-02T00:00:00Z", "/a/two.enc", ("azaion/x:1", "azaion/y:1"))
    error = find_conflict(second, [first, second])
    assert error is not None and error.reason == "RefConflict" and not error.transient
    assert "first" in error.message and "azaion/x:1" in error.message and "/a/one.enc" in error.message
    # when both hold it (both Ready at once), the earlier one keeps the ref
    assert find_conflict(first, [first, second], held=frozenset({"azaion/x:1"})) is None


def test_no_conflict_for_the_same_archive_other_refs_or_another_runtime():
    first = claim("first", "2026-01-01T00:00:00Z")
    assert find_conflict(claim("same-archive", "2026-01-02T00:00:00Z", "/a/./images.enc"), [first]) is None
    assert find_conflict(claim("other-refs", "2026-01-02T00:00:00Z", "/b.enc", ("azaion/y:1",)), [first]) is None
    assert find_conflict(claim("other-rt", "2026-01-02T00:00:00Z", "/b.enc", runtime="containerd"), [first]) is None


def test_equal_creation_times_are_ordered_by_namespace_and_name():
    a = claim("a", "2026-01-01T00:00:00Z", "/a.enc")
    b = claim("b", "2026-01-01T00:00:00Z", "/b.enc")
    held = frozenset({"azaion/x:1"})
    assert find_conflict(a, [b], held) is None and find_conflict(b, [a], held) is not None


def test_an_older_object_edited_to_name_a_held_ref_does_not_take_it_over():
    """Review of issue 18 (high): creation time never changes with an edit, so a placeholder
    created long ago in another namespace, edited to request a ref another tenant holds,
    won the ref and loaded over it; the holder, repairing, was the one stalled."""
    holder = claim("app", "2026-06-01T00:00:00Z", "/a/team-a.enc", refs=("team-a/app:1.0",), namespace="team-a")
    placeholder = claim("old", "2026-01-01T00:00:00Z", "/a/team-b.enc", refs=("team-a/app:1.0",), namespace="team-b")
    error = find_conflict(placeholder, [holder])
    assert error is not None and error.reason == "RefConflict"
    # and the holder, re-verifying, is not stalled by the newcomer (which holds nothing)
    assert find_conflict(holder, [], held=frozenset({"team-a/app:1.0"})) is None


def test_an_owner_in_another_namespace_is_not_named():
    """Review: the message showed other tenants' object names and archive paths."""
    first = claim("secret-project", "2026-01-01T00:00:00Z", "/a/hidden.enc", namespace="team-a")
    error = find_conflict(claim("mine", "2026-01-02T00:00:00Z", "/a/two.enc", namespace="team-b"), [first])
    assert error is not None and "another namespace" in error.message
    assert "secret-project" not in error.message and "hidden" not in error.message and "team-a" not in error.message
