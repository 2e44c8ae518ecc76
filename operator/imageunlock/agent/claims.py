"""Which ImageUnlock owns an image ref (pure).

Two ImageUnlocks that load the same ``NAME:VERSION`` into the same runtime from different
archives would overwrite each other's tag on every re-verification, each "repairing" what
the other just loaded. The one that holds the ref (Ready with its verified ID) keeps it,
whatever the other's age: an old object edited to name a held ref must not take it over
(creation time never changes with an edit). Only when both hold it (e.g. both became Ready
at once) does the earlier one (by creation time, then namespace/name) keep it. The other is
stalled with a message naming the owner, until one of them changes.
The same ref from the same archive path is no conflict: it is the same content, and the
archive lock serialises the loads.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

from imageunlock.errors import RefConflictError


@dataclass(frozen=True)
class Claim:
    namespace: str
    name: str
    created: str  # metadata.creationTimestamp (RFC 3339 UTC sorts as text)
    runtime: str
    archive_path: str
    refs: frozenset[str]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.created, self.namespace, self.name)


def find_conflict(mine: Claim, others: Iterable[Claim], held: frozenset[str] = frozenset()) -> RefConflictError | None:
    """The error to stall ``mine`` with, if another object holds one of its refs (``others``:
    held claims) loaded from another archive into the same runtime, and ``mine`` does not
    hold it too (``held``) or is the later one; else None."""
    archive = posixpath.normpath(mine.archive_path)
    for other in sorted(others, key=lambda c: c.key):
        if (other.namespace, other.name) == (mine.namespace, mine.name):
            continue
        if other.runtime != mine.runtime or posixpath.normpath(other.archive_path) == archive:
            continue
        shared = sorted(mine.refs & other.refs)
        if shared and (other.key < mine.key or not set(shared) <= held):
            # Another namespace's objects and paths are not ours to show.
            owner = (
                f"ImageUnlock {other.name} (archive {other.archive_path!r})"
                if other.namespace == mine.namespace
                else "an ImageUnlock in another namespace, from another archive"
            )
            return RefConflictError(
                f"{', '.join(shared[:3])}{' and more' if len(shared) > 3 else ''} is already loaded by "
                f"{owner}; two archives would load over each other's images: drop the image from one "
                "of them, or delete one ImageUnlock"
            )
    return None
