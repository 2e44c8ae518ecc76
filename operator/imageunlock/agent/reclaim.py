"""Giving back what no ImageUnlock wants any more, on this node (blocking: worker threads).

The rule is engine/reclaim.py's; this is the I/O around it. Three moments:

* :meth:`Reclaimer.after_ready`: an ImageUnlock's entry just became Ready here — the refs its
  earlier versions loaded get its ``spec.reclaimPolicy``. Never before Ready: a failed
  upgrade keeps the old version runnable.
* :meth:`Reclaimer.deleted`: the agent saw it deleted — all of its refs get its policy
  (there is no finalizer: deletion stays instant).
* :meth:`Reclaimer.sweep`: at start-up and every verify interval — refs recorded for an
  ImageUnlock that no longer exists (a delete the agent missed, or one while it was not
  running), and superseded refs of one that is Ready here (a reclaim that failed before).

Each reads the runtime's ownership records first and lists every ImageUnlock after, so a ref
loaded for a spec the list does not show yet cannot be among the records. An ImageUnlock
deleted while this agent was not running gets the default policy (``Unpin``): its own is gone
with it, unless this node recorded it: the policy of every ImageUnlock the agent saw is kept
in ``<IMAGEUNLOCK_STATE_DIR>/reclaim-policies.json`` (names and policies only), so a
``Retain`` one deleted while the agent was down stays retained.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from imageunlock.app import logs
from imageunlock.engine.models import OwnershipRecord, Phase, is_owner, owner_of
from imageunlock.engine.reclaim import (
    DEFAULT_POLICY,
    Reclaimed,
    ReclaimPolicy,
    orphaned,
    parse_policy,
    reclaimable,
    wanted_by,
)
from imageunlock.engine.refs import normalize_ref
from imageunlock.engine.runtimes import read_state_file, state_dir
from imageunlock.kube import conditions as st
from imageunlock.kube.client import KubernetesApi
from imageunlock.kube.models import NodeEntry
from imageunlock.kube.models import Reclaimed as ReclaimedStatus

log = logging.getLogger(__name__)

REASON = "Reclaimed"
POLICY_NAMES = frozenset(p.value for p in ReclaimPolicy)


def _owner(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


class Reclaimer:
    def __init__(
        self,
        runtime: Any,
        kube: KubernetesApi,
        node: str,
        entry: Callable[[Mapping[str, Any]], NodeEntry],
        directory: str | None = None,
        known: Callable[[], Iterable[Mapping[str, Any]]] | None = None,
        owners: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Reads the recorded policies (file I/O: build it off the event loop)."""
        self.runtime = runtime
        self.kube = kube
        self.node = node
        self.entry = entry  # this node's entry of an object (NodeAgent.entry)
        # The objects the agent watches: when they show nothing to do, a sweep asks the API
        # server nothing (a fleet's nodes each listing every ImageUnlock every interval would
        # load it for nothing). A LIST confirms whatever they suggest.
        self.known = known
        # IMAGEUNLOCK_IMAGE_OWNERS: an object keeps from a reclaim only names its namespace may
        # unlock (engine.reclaim.wanted_by); empty, any name it names.
        self.owners = owners or {}
        # (owner, ref) a reclaim dealt with (or Retain keeps): not a reason to list again
        self._settled: set[tuple[str, str]] = set()
        self.path = os.path.join(directory or state_dir(), "reclaim-policies.json")
        self.policies: dict[str, ReclaimPolicy] = self._read()  # owner -> policy of every object seen
        self._lock = threading.Lock()  # one reclaim at a time on this node
        self._policy_lock = threading.Lock()  # workers record policies concurrently

    def seen(self, body: Mapping[str, Any]) -> None:
        """Remember an object's policy: it is gone with the object when it is deleted."""
        self._remember(_owner(body), parse_policy((body.get("spec") or {}).get("reclaimPolicy")))

    def _remember(self, owner: str, policy: ReclaimPolicy) -> None:
        if self.policies.get(owner) is policy:
            return
        with self._policy_lock:
            self.policies[owner] = policy
            self._write()

    def _write(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".reclaim-", suffix=".tmp", dir=os.path.dirname(self.path))
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({owner: p.value for owner, p in sorted(self.policies.items())}, f)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:  # kept in memory: only a restart forgets it
            log.warning("could not record reclaim policies in %s (%s)", self.path, exc.strerror or exc)

    def _read(self) -> dict[str, ReclaimPolicy]:
        """The recorded policies: only from a plain file of the agent's own (read_state_file),
        only entries an ImageUnlock could have (``<namespace>/<name>``, a policy name)."""
        data = read_state_file(self.path, "reclaim policies")
        if data is None:
            return {}
        try:
            raw = json.loads(data)
        except ValueError as exc:
            log.warning("reclaim policies %s unreadable (%s): the default applies", self.path, exc)
            return {}
        if not isinstance(raw, dict):
            return {}
        policies = {
            k: ReclaimPolicy(v) for k, v in raw.items() if is_owner(k) and isinstance(v, str) and v in POLICY_NAMES
        }
        if dropped := len(raw) - len(policies):
            log.warning("reclaim policies %s: %d malformed entr(ies) ignored", self.path, dropped)
        return policies

    def after_ready(self, body: Mapping[str, Any], entry: NodeEntry) -> NodeEntry | None:
        """``entry`` (Ready for the current generation, written) with what this reclaim gave
        back of the object's earlier versions; None when nothing was given back."""
        policy = parse_policy((body.get("spec") or {}).get("reclaimPolicy"))
        self.seen(body)
        if policy is ReclaimPolicy.RETAIN:
            return None
        meta = body.get("metadata") or {}
        owner = owner_of(str(meta.get("namespace")), str(meta.get("name")))
        with self._lock:
            self._settled = {settled for settled in self._settled if settled[0] != owner}
            records = self.runtime.owned_refs()
            if not reclaimable(records, owner, self._wanted([body])):
                return None  # the common case: no API request
            done = self._reclaim(body, owner, policy, reclaimable(records, owner, self._wanted([body, *self._list()])))
        return None if done is None else entry.model_copy(update={"reclaimed": _status(done)})

    def deleted(self, namespace: str, name: str, policy: ReclaimPolicy | None = None) -> Reclaimed | None:
        """All refs of the deleted ImageUnlock ``namespace/name`` that no other wants."""
        owner = owner_of(namespace, name)
        policy = policy or self.policies.get(owner, DEFAULT_POLICY)
        if policy is ReclaimPolicy.RETAIN:
            return None
        with self._lock:
            records = [r for r in self.runtime.owned_refs() if r.owner == owner]
            if not records:
                return None
            bodies = self._list()
            if any(_owner(b) == owner for b in bodies):
                return None  # created anew under the same name: it wants them again
            refs = reclaimable(records, owner, self._wanted(bodies))
            return self._reclaim({"metadata": {"namespace": namespace, "name": name}}, owner, policy, refs)

    def sweep(self) -> list[Reclaimed]:
        """Start-up and every verify interval: what :meth:`deleted` and :meth:`after_ready`
        would have done and did not (a missed event, a restart, a failed runtime call)."""
        done: list[Reclaimed] = []
        with self._lock:
            records = self.runtime.owned_refs()
            if not records or (self.known is not None and not self._pending(records, list(self.known()))):
                return done
            bodies = self._list()
            keep = self._wanted(bodies)
            alive = {_owner(b): b for b in bodies}
            for owner, refs in orphaned(records, alive).items():
                policy = self.policies.get(owner, DEFAULT_POLICY)
                namespace, _, name = owner.partition("/")
                body = {"metadata": {"namespace": namespace, "name": name}}
                if policy is ReclaimPolicy.RETAIN:
                    self._settled.update((owner, ref) for ref in refs)
                elif result := self._reclaim(body, owner, policy, reclaimable(_only(records, refs), owner, keep)):
                    done.append(result)
            for owner, body in alive.items():
                policy = parse_policy((body.get("spec") or {}).get("reclaimPolicy"))
                self._remember(owner, policy)
                entry = self.entry(body)
                generation = int((body.get("metadata") or {}).get("generation") or 0)
                if policy is ReclaimPolicy.RETAIN or (entry.phase, entry.observed_generation) != (
                    Phase.READY,
                    generation,
                ):
                    continue  # only after the current version is Ready here
                # The Event says what it did; the entry is the reconciler's (a reconcile of the
                # object may be writing it right now), so the sweep leaves it alone.
                refs = reclaimable(records, owner, keep)
                if refs and (result := self._reclaim(body, owner, policy, refs)) is not None:
                    done.append(result)
            self._forget(set(self.policies) - set(alive) - {r.owner for r in records})
        return done

    def _forget(self, owners: set[str]) -> None:
        """Drop the recorded policies of ImageUnlocks that are gone and left nothing here."""
        if owners:
            with self._policy_lock:
                for owner in owners:
                    self.policies.pop(owner, None)
                self._write()

    def _pending(self, records: Iterable[OwnershipRecord], bodies: list[Mapping[str, Any]]) -> bool:
        """Whether the watched objects suggest a reclaim: a record not yet dealt with whose
        owner is not among them, or whose owner no longer names it and does not retain."""
        keep = self._wanted(bodies)
        alive = {_owner(b): b for b in bodies}
        for record in records:
            if (record.owner, record.ref) in self._settled:
                continue
            body = alive.get(record.owner)
            if body is None:
                return True
            policy = parse_policy((body.get("spec") or {}).get("reclaimPolicy"))
            if policy is not ReclaimPolicy.RETAIN and normalize_ref(record.ref) not in keep:
                return True
        return False

    def _wanted(self, bodies: Iterable[Mapping[str, Any]]) -> set[str]:
        """What ``bodies`` keep from a reclaim (with image owners, only names their namespace
        may unlock)."""
        return wanted_by(bodies, self.owners)

    def _list(self) -> list[dict[str, Any]]:
        return self.kube.list_unlocks()

    def _reclaim(self, body: Mapping[str, Any], owner: str, policy: ReclaimPolicy, refs: list[str]) -> Reclaimed | None:
        """Apply ``policy`` to ``refs`` (all ``owner``'s, none wanted): one Event and one log
        line when it changed anything."""
        if not refs or policy is ReclaimPolicy.RETAIN:
            return None
        if policy is ReclaimPolicy.DELETE:
            removed, kept = self.runtime.remove(refs)
            result = Reclaimed(policy, tuple(removed), tuple(kept))
        else:
            result = Reclaimed(policy, tuple(self.runtime.unpin(refs)))
        # Dealt with, but what a container keeps: the sweep tries that again each interval.
        self._settled.update((owner, ref) for ref in refs if ref not in result.kept)
        if not result.done:
            if result.kept:
                log.info("%s: %s", owner, result.message())
            return None
        message = result.message()
        self.kube.post_event(body, "Normal", REASON, f"node {self.node}: {message}")
        namespace, _, name = owner.partition("/")
        log.info("%s: %s", owner, message, extra=logs.fields(namespace, name, REASON))
        return result


def _only(records: Iterable[OwnershipRecord], refs: Iterable[str]) -> list[OwnershipRecord]:
    chosen = set(refs)
    return [r for r in records if r.ref in chosen]


def _status(result: Reclaimed) -> ReclaimedStatus:
    return ReclaimedStatus(
        policy="Delete" if result.policy is ReclaimPolicy.DELETE else "Unpin",
        version=result.version,
        count=len(result.done),
        refs=list(result.done),
        kept=list(result.kept) or None,
        time=st.now_rfc3339(),
    )
