"""Which images to give back once they are no longer wanted (pure: the rule, no I/O).

An unlock pins what it loads, so kubelet's image garbage collection never takes it: without
a reclaim every version ever unlocked stays on the node. ``reclaimPolicy`` says what happens
to refs an ImageUnlock no longer wants — those its earlier versions loaded, once its current
version is Ready on the node, and all of them once it is deleted:

* ``Retain``: nothing (the behaviour before the policy existed).
* ``Unpin`` (the default): the pin goes, so kubelet's GC may take them under disk pressure
  (containerd; the Docker Engine pins nothing, so nothing changes there).
* ``Delete``: removed, unless a container (running or stopped) uses the image.

The rule, :func:`reclaimable`, only ever hands out refs this node's agent loaded for that
very ImageUnlock (its ownership records), never one that any ImageUnlock's current spec names
(``keep``): an image someone else loaded, or that another ImageUnlock still wants, is never
touched. With image owners configured (IMAGEUNLOCK_IMAGE_OWNERS), a spec keeps only names its
namespace may unlock (:func:`wanted_by`): another tenant cannot hold a name's old versions
back from its owner's reclaim. Without them (one tenant), any spec keeps any name it names.
The adapters (the runtime's ``unpin``/``remove``) do the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from imageunlock.defaults import DEFAULT_IMAGES
from imageunlock.engine.models import OwnershipRecord
from imageunlock.engine.refs import normalize_ref, owned


class ReclaimPolicy(StrEnum):
    RETAIN = "Retain"
    UNPIN = "Unpin"
    DELETE = "Delete"


DEFAULT_POLICY = ReclaimPolicy.UNPIN


def parse_policy(value: object) -> ReclaimPolicy:
    """The policy a spec names; the default when it names none or one this version does not
    know (a newer CRD): the milder of the two that change anything."""
    try:
        return ReclaimPolicy(str(value)) if value else DEFAULT_POLICY
    except ValueError:
        return DEFAULT_POLICY


def wanted(specs: Iterable[Mapping[str, object]]) -> set[str]:
    """Every ref the ImageUnlock ``specs`` (raw, as the API server holds them) name, in the
    normal form: whatever an object's state, runtime or validity, what it names is not
    reclaimed. Without image owners (one tenant) this is the whole rule; with them,
    :func:`wanted_by`."""
    refs: set[str] = set()
    for spec in specs:
        refs.update(_named(spec))
    return refs


def wanted_by(objects: Iterable[Mapping[str, object]], owners: Mapping[str, Sequence[str]] | None = None) -> set[str]:
    """What the ImageUnlock ``objects`` (raw, with metadata) keep from a reclaim. Without
    ``owners`` (IMAGEUNLOCK_IMAGE_OWNERS unset: one tenant), :func:`wanted` of their specs:
    any object keeps any ref it names. With them, an object keeps only the names its
    namespace may unlock (``owners[namespace]``, as the reconciler's check): another tenant
    naming ``team-a/app`` at team A's old versions, which its own unlock would refuse, does
    not keep them from team A's Unpin/Delete on every node (a disk filled that way would hold
    every tenant's imports back behind the DiskPressure gate)."""
    refs: set[str] = set()
    for obj in objects:
        spec = obj.get("spec")
        if not isinstance(spec, Mapping):
            continue
        if not owners:
            refs.update(_named(spec))
            continue
        meta = obj.get("metadata")
        namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
        prefixes = owners.get(namespace, ()) if isinstance(namespace, str) else ()
        refs.update(_named(spec, prefixes))
    return refs


def _named(spec: Mapping[str, object], prefixes: Sequence[str] | None = None) -> set[str]:
    """The refs (normal form) ``spec`` names; with ``prefixes``, only names under them."""
    version, images = spec.get("version"), spec.get("images")
    names = images if isinstance(images, list) and images else DEFAULT_IMAGES
    if not (isinstance(version, str) and version):
        return set()
    return {
        normalize_ref(f"{name}:{version}")
        for name in names
        if isinstance(name, str) and (prefixes is None or owned(name, prefixes))
    }


def reclaimable(records: Iterable[OwnershipRecord], owner: str, keep: Iterable[str]) -> list[str]:
    """The refs (as the runtime names them, sorted, each once) recorded as loaded for
    ``owner`` that no current spec wants (``keep``: every ImageUnlock's current refs, in any
    spelling)."""
    wanted = {normalize_ref(ref) for ref in keep}
    return sorted({r.ref for r in records if r.owner == owner and normalize_ref(r.ref) not in wanted})


def superseded(previous: Mapping[str, str], present: Mapping[str, str | None], keep: Iterable[str]) -> list[str]:
    """For a run without ownership records (the CLI): the refs an earlier run verified
    (``previous``: ref -> the image ID it verified) that the current one does not want
    (``keep``) and that still hold that very image (``present``: ref -> image ID now). A ref
    someone re-tagged or loaded anew since is not the earlier run's to give back."""
    wanted = {normalize_ref(ref) for ref in keep}
    return sorted(
        ref
        for ref, image_id in previous.items()
        if normalize_ref(ref) not in wanted and image_id and present.get(ref) == image_id
    )


def orphaned(records: Iterable[OwnershipRecord], existing: Iterable[str]) -> dict[str, list[str]]:
    """``{owner: refs}`` recorded for ImageUnlocks that no longer exist (``existing``: the
    owners ``<namespace>/<name>`` of every ImageUnlock there is)."""
    alive = set(existing)
    found: dict[str, set[str]] = {}
    for record in records:
        if record.owner not in alive:
            found.setdefault(record.owner, set()).add(record.ref)
    return {owner: sorted(refs) for owner, refs in sorted(found.items())}


def versions(refs: Iterable[str]) -> str:
    """The tags of ``refs``, each once (``1.0.0``, or ``1.0.0, 1.1.0``): what an event names."""
    tags: dict[str, None] = {}
    for ref in refs:
        name = normalize_ref(ref).partition("@")[0]
        colon = name.rfind(":")
        tags[name[colon + 1 :] if colon > name.rfind("/") else "?"] = None
    return ", ".join(tags)


@dataclass(frozen=True)
class Reclaimed:
    """What one reclaim did on a node: ``done`` unpinned or removed, ``kept`` left because a
    container uses them (``Delete`` only)."""

    policy: ReclaimPolicy
    done: tuple[str, ...]
    kept: tuple[str, ...] = ()

    @property
    def verb(self) -> str:
        return "removed" if self.policy is ReclaimPolicy.DELETE else "unpinned"

    @property
    def version(self) -> str:
        return versions((*self.done, *self.kept))

    def message(self) -> str:
        """``unpinned 7 image(s) of 1.0.0`` (and what stayed in use)."""
        text = f"{self.verb} {len(self.done)} image(s) of {versions(self.done) or self.version}"
        if self.kept:
            text += f"; kept {len(self.kept)} a container uses ({', '.join(self.kept[:3])}"
            text += " and more)" if len(self.kept) > 3 else ")"
        return text
