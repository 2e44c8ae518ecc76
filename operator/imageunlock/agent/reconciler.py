"""One reconciliation of one ImageUnlock on this node: spec → unlock service → this node's
status entry, events and log lines.

Framework-free and blocking: the agent's scheduler (resync.py) calls it from worker threads
and gets an :class:`Outcome` back: Ready, Stalled (a user mistake: looked at again when an
input changes) or Retry (a transient fault: looked at again after ``delay``).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Protocol

from imageunlock import metrics
from imageunlock.agent.claims import Claim, find_conflict
from imageunlock.agent.reclaim import Reclaimer
from imageunlock.agent.verdicts import LoginVerdicts
from imageunlock.app import logs
from imageunlock.app.config import AgentConfig
from imageunlock.engine import archive, runtimes
from imageunlock.engine.keys import ApiClientConfig, KeySettings, build_key_source
from imageunlock.engine.keys import sealed as sealed_keys
from imageunlock.engine.keys.cache import CachingKeySource, KeyCache
from imageunlock.engine.keys.sealed import SealedKeySource
from imageunlock.engine.models import KeySource, Phase, Runtime, owner_of
from imageunlock.engine.refs import describe, normalize_ref, owned
from imageunlock.engine.service import UnlockService, VerifiedArchives
from imageunlock.errors import ConfigurationError, InternalError, NodeDiskPressureError, RefConflictError, UnlockError
from imageunlock.kube import conditions as st
from imageunlock.kube.client import KubernetesApi
from imageunlock.kube.models import Image, NodeEntry, Progress
from imageunlock.kube.spec import UnlockSpec, check_runtime, parse_spec

log = logging.getLogger(__name__)

# Set it to any new value (e.g. a timestamp) to have the operator verify now, and re-check
# a Stalled ImageUnlock whose inputs did not change.
REQUESTED_AT = "loader.azaion.com/requested-at"


def known_ids(entry: NodeEntry, generation: int) -> dict[str, str]:
    """Image IDs a finished reconcile of this generation verified on this node (the entry's
    images); the fast path insists on them, so a retagged impostor is not taken for the real
    image."""
    if entry.observed_generation != generation:
        return {}
    return {i.name: i.id for i in entry.images or () if i.name and i.id}


class Entries(Protocol):
    """This node's entries (agent/node.py NodeAgent): the one an object holds, and applying one."""

    node: str

    def entry(self, body: Mapping[str, Any]) -> NodeEntry: ...

    def apply(self, body: Mapping[str, Any], entry: NodeEntry) -> None: ...


def owner_tag(namespace: str, name: str) -> tuple[str, str, str]:
    """The KeyCache tag of the keys kept for one ImageUnlock."""
    return ("owner", namespace, name)


def secret_tag(namespace: str, secret: str) -> tuple[str, str, str]:
    """The KeyCache tag of the keys fetched with one Secret's credentials."""
    return ("secret", namespace, secret)


class Verdict(Enum):
    """How a reconcile ended, for the scheduler that drives it (resync.py)."""

    READY = "ready"
    STALLED = "stalled"  # a user mistake: nothing changes until the spec, Secret or archive does
    RETRY = "retry"  # a transient fault: again after ``Outcome.delay``


@dataclass(frozen=True)
class Inputs:
    """What a Stalled outcome depended on (see :meth:`Reconciler.inputs`)."""

    generation: Any
    requested: Any
    secret: Any = None
    archive: Any = None
    conflict: Any = None

    def changed(self, before: Inputs | None, reason: str | None) -> bool:
        """Whether a re-check could end differently. Rejected credentials only change with
        the Secret (or the spec, or a request): touching the archive does not buy a re-login."""
        if before is None:
            return True
        if reason == "AuthenticationFailed":
            return (self.generation, self.requested, self.secret) != (
                before.generation,
                before.requested,
                before.secret,
            )
        return self != before


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    message: str = ""
    reason: str = ""
    delay: float = 0.0


def _claim(body: Mapping[str, Any], spec: UnlockSpec) -> Claim:
    meta = body.get("metadata") or {}
    return Claim(
        str(meta.get("namespace") or ""),
        str(meta.get("name") or ""),
        str(meta.get("creationTimestamp") or ""),
        spec.runtime,
        spec.archive_path,
        frozenset(normalize_ref(ref) for ref in spec.to_request().refs),
    )


class Reconciler:
    def __init__(
        self,
        settings: AgentConfig,
        runtime: Runtime,
        kube: KubernetesApi,
        entries: Entries,
        others: Callable[[], Iterable[Mapping[str, Any]]] = tuple,
        disk_pressure: Callable[[], bool] = lambda: False,
        reclaimer: Reclaimer | None = None,
        jitter: Callable[[int, float, float], float] | None = None,
        may_cache_keys: bool = True,
    ) -> None:
        self.settings = settings
        # False when the process could not be made non-dumpable (app/hardening.py): no key is
        # kept in memory then, whatever spec.keyCacheSeconds says (the node fetches per unlock).
        self.may_cache_keys = may_cache_keys
        self._said_no_cache = False
        self.disk_pressure = disk_pressure  # the Node's DiskPressure condition is True (agent/node.py)
        self.reclaimer = reclaimer  # gives back earlier versions' images once Ready (agent/reclaim.py)
        # A transient fault's retry delay for (attempt, base, cap): full jitter, so nodes that
        # failed together do not retry in lock-step (a test may pass a fixed one).
        self.jitter = jitter or functools.partial(st.full_jitter, rng=random.Random())
        self.runtime = runtime
        self.kube = kube
        self.entries = entries  # where status goes: this node's entry, never the summary
        self.others = others  # every other ImageUnlock the operator knows of (for claims)
        self._claims: dict[tuple[Any, Any, Any], Claim | None] = {}
        self.verdicts = LoginVerdicts()  # the fleet's login verdicts, per Secret resourceVersion
        # Keys kept in memory for spec.keyCacheSeconds (none unless an ImageUnlock asks).
        self.key_cache = KeyCache()
        self.node_verified = VerifiedArchives()  # what this node verified, for every ImageUnlock
        self.key_settings = KeySettings(
            settings.default_api_url,
            tuple(settings.api_url_allowlist),
            ApiClientConfig(
                connect_timeout=settings.api_connect_timeout,
                read_timeout=settings.api_read_timeout,
                retries=settings.api_retries,
                deadline=settings.api_deadline,
            ),
        )

    def entry(self, body: Mapping[str, Any]) -> NodeEntry:
        """This node's entry of ``body``: what it last reported on the object."""
        return self.entries.entry(body)

    def parse(self, body: Mapping[str, Any]) -> UnlockSpec:
        settings = self.settings
        runtime = settings.runtime if settings.runtime != "auto" else self.runtime.name
        spec = parse_spec(body.get("spec") or {}, settings.default_api_url, settings.api_url_allowlist)
        return check_runtime(spec, runtime)

    def service(
        self,
        spec: UnlockSpec,
        namespace: str,
        body: Mapping[str, Any] | None = None,
        refused: Callable[[str], None] | None = None,
    ) -> UnlockService:
        """The unlock service for ``spec``. With ``body``, the key source's login goes through
        the fleet's verdict (agent/verdicts.py); ``refused`` is told the Secret's
        resourceVersion a login was refused for."""
        # Credentials only ever come from a Secret of the ImageUnlock's own namespace.
        keys = build_key_source(
            spec.key_source, self.key_settings, lambda secret: self.kube.read_credentials(namespace, secret)
        )
        if body is not None and (secret := spec.key_source.secret_name):
            keys = self.verdicts.wrap(
                keys,
                node=self.entries.node,
                body=body,
                secret=secret,
                version=lambda: self.kube.secret_version(namespace, secret),
                refused=refused or (lambda _version: None),
            )
            if spec.key_cache_seconds > 0 and not self.may_cache_keys:
                if not self._said_no_cache:
                    self._said_no_cache = True
                    log.warning(
                        "spec.keyCacheSeconds is not honoured on this node: the agent process could not be "
                        "made non-dumpable, so no key is kept in memory; keys are fetched for every unlock"
                    )
            elif spec.key_cache_seconds > 0:
                name = str((body.get("metadata") or {}).get("name") or "")
                keys = CachingKeySource(
                    keys,
                    self.key_cache,
                    self._cache_binding(spec, namespace, secret),
                    spec.key_cache_seconds,
                    tags=(owner_tag(namespace, name), secret_tag(namespace, secret)),
                )
        # Outermost: the key sealed to this node's TPM, unsealed before any other source is asked.
        if spec.key_sealing == "TPM":
            keys = self.sealed(keys, spec, namespace)
        return UnlockService(
            self.runtime,
            keys,
            archive_roots=self.roots(namespace),
            # Another unlock of the same archive is waited for, not failed and retried: it
            # is one import, and this one then finds its images verified (node_verified).
            lock_timeout=self.settings.runtime_timeout,
            verified=self.node_verified,
            scope=namespace,
            may_start=self.check_disk,
        )

    def check_disk(self) -> None:
        """No import starts on a node under DiskPressure (issue 20, item 2): retried with
        backoff, and at once when the condition clears (resync.py)."""
        if self.disk_pressure():
            node = getattr(self.entries, "node", "") or "this node"
            raise NodeDiskPressureError(
                f"node {node} reports DiskPressure: the import waits until the condition clears "
                "(free disk space on the node); images already loaded are not affected"
            )

    def release_keys(self, namespace: str, name: str, body: Mapping[str, Any] | None) -> None:
        """Revoke the keys kept for ImageUnlock ``namespace/name`` unless ``body`` (None: it is
        deleted) still asks for a cache: a spec edited to keyCacheSeconds 0 (or absent, or no
        longer valid) drops them now, not at the end of the old window."""
        if body is not None:
            try:
                if self.parse(body).key_cache_seconds > 0:
                    return
            except UnlockError:
                pass
        if dropped := self.key_cache.drop(owner_tag(namespace, name)):
            log.info("%s/%s: %d kept key(s) dropped (no longer cached for it)", namespace, name, dropped)

    def secret_changed(self, namespace: str, secret: str) -> None:
        """Secret ``namespace/secret`` got a new resourceVersion or was deleted: the keys fetched
        with its credentials are revoked now (their bindings would no longer match anyway)."""
        if dropped := self.key_cache.drop(secret_tag(namespace, secret)):
            log.info("Secret %s/%s changed: %d kept key(s) dropped", namespace, secret, dropped)

    def keeps_keys(self, namespace: str, secret: str) -> bool:
        """Whether a key fetched with Secret ``namespace/secret`` is kept (its watch then
        revokes it at once when the Secret changes)."""
        return self.key_cache.holds(secret_tag(namespace, secret))

    def _cache_binding(self, spec: UnlockSpec, namespace: str, secret: str) -> Callable[[], tuple[Any, ...] | None]:
        """What a kept key is good for: this key source and Secret at its current
        resourceVersion (None while there is no Secret: deleting it revokes the key), and
        this very archive file (device, inode, size, mtimes: a new file is a new key)."""

        def binding() -> tuple[Any, ...] | None:
            version = self.kube.secret_version(namespace, secret)
            if version is None:
                return None
            where = archive.signature(spec.archive_path, self.roots(namespace))
            return (namespace, secret, version, spec.key_source, spec.archive_path, where)

        return binding

    def sealed(self, keys: KeySource, spec: UnlockSpec, namespace: str) -> SealedKeySource:
        """``keys`` behind the key sealed to this node's TPM (spec.keySealing TPM), its blobs
        in the agent's state directory (IMAGEUNLOCK_STATE_DIR)."""
        source = spec.key_source
        identity = sealed_keys.archive_identity(
            namespace,
            " ".join((source.member, getattr(source, "url", ""), source.secret_name or "")),
            spec.archive_path,
            self.roots(namespace),
            spec.archive_sha256,
        )
        store = sealed_keys.SealedKeyStore(os.path.join(runtimes.state_dir(), sealed_keys.SEALED_DIR))
        sealing = sealed_keys.Sealing(tcti=self.settings.tpm_tcti, pcrs=spec.key_sealing_pcrs)
        return sealed_keys.SealedKeySource(keys, store, identity, sealing)

    def check_owner(self, namespace: str, spec: UnlockSpec) -> None:
        """With IMAGEUNLOCK_IMAGE_OWNERS, a namespace may unlock only the image names given to
        it: names are node-wide, and one tenant must not take a name another one uses."""
        owners = self.settings.image_owners
        if not owners:
            return
        prefixes = owners.get(namespace, ())
        if foreign := [image for image in spec.images if not owned(image, prefixes)]:
            allowed = ", ".join(prefixes) or "none"
            raise ConfigurationError(
                f"namespace {namespace!r} may not unlock {describe(foreign)} (its image names: {allowed}; "
                "operator setting IMAGEUNLOCK_IMAGE_OWNERS): correct spec.images or ask the cluster's "
                "administrator"
            )

    def roots(self, namespace: str) -> tuple[str, ...]:
        roots = self.settings.roots_for(namespace)
        if not roots:  # never "no roots" (which means any path) for an object
            raise ConfigurationError(f"namespace {namespace!r} cannot have an archive directory")
        return roots

    def conflict(self, body: Mapping[str, Any], spec: UnlockSpec) -> RefConflictError | None:
        """Only an ImageUnlock that holds its refs counts as a claim: Ready at its generation,
        with the IDs it verified. A Stalled or invalid one (say, a squatter naming a path that
        does not exist) claims nothing, so it cannot block anyone else's unlock."""
        claims = [claim for other in self.others() if (claim := self._held_claim(other)) is not None]
        own = self._held_claim(body)
        return find_conflict(_claim(body, spec), claims, own.refs if own is not None else frozenset())

    def _held_claim(self, body: Mapping[str, Any]) -> Claim | None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace"), meta.get("name"), meta.get("resourceVersion"))
        if key[2] is not None and key in self._claims:  # parsed once per version of each object
            return self._claims[key]
        claim = None
        entry = self.entry(body)
        verified = known_ids(entry, int(meta.get("generation") or 0))
        if entry.phase is Phase.READY and verified:
            try:
                spec = self.parse(body)
            except UnlockError:
                spec = None
            if spec is not None:
                claim = replace(_claim(body, spec), refs=frozenset(normalize_ref(ref) for ref in verified))
        if len(self._claims) > 10_000:
            self._claims.clear()  # bounded: entries of old versions go
        self._claims[key] = claim
        return claim

    def inputs(self, body: Mapping[str, Any]) -> Inputs:
        """Everything a Stalled ImageUnlock's outcome depends on: re-checking it is worth a
        login only when one of these changed (never a timed retry of known-bad credentials,
        which gets accounts locked)."""
        meta = body.get("metadata") or {}
        requested = (meta.get("annotations") or {}).get(REQUESTED_AT)
        try:
            spec = self.parse(body)
        except UnlockError:
            return Inputs(meta.get("generation"), requested)
        conflict = self.conflict(body, spec)
        return Inputs(
            meta.get("generation"),
            requested,
            self.kube.secret_version(meta.get("namespace", ""), spec.key_source.secret_name)
            if spec.key_source.secret_name
            else None,
            archive.signature(spec.archive_path, self.roots(str(meta.get("namespace") or ""))),
            conflict.message if conflict else None,
        )

    def still_ready(self, body: Mapping[str, Any]) -> bool:
        """Whether a Ready ImageUnlock's images are all still there with their verified IDs
        and nothing conflicts; raises a transient UnlockError when the runtime is down."""
        try:
            spec = self.parse(body)
        except UnlockError:
            return False  # e.g. an allow-list narrowed since: reconcile says why
        meta = body.get("metadata") or {}
        try:
            self.check_owner(str(meta.get("namespace") or ""), spec)
        except ConfigurationError:
            return False  # the names are no longer this namespace's: reconcile says why
        if self.conflict(body, spec) is not None:
            return False
        known = known_ids(self.entry(body), int(meta.get("generation") or 0))
        return self.service(spec, str(meta.get("namespace") or "")).present(spec.to_request(known)) is not None

    def verified(self, body: Mapping[str, Any]) -> None:
        """Record a re-verification that found everything in place (no reconcile needed)."""
        self.entries.apply(body, _handled(self.entry(body), body))

    def reconcile(self, body: Mapping[str, Any], attempt: int = 0) -> Outcome:
        started = time.monotonic()
        meta = body.get("metadata", {})
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        generation = int(meta.get("generation") or 0)
        entry = self.entry(body)
        run = _Reconciliation(self, body, entry, namespace, name, generation)
        cached: CachingKeySource | None = None
        sealed: SealedKeySource | None = None
        try:
            try:
                spec = self.parse(body)
            finally:
                self.release_keys(namespace, name, body)  # no longer cached for it: dropped now
            self.check_owner(namespace, spec)
            # No "reconciling" write of its own: a fast path ends in one write (Ready), and an
            # unlock's first step writes its phase anyway.
            if (conflict := self.conflict(body, spec)) is not None:
                raise conflict
            known = known_ids(entry, generation)
            service = self.service(spec, namespace, body, run.refused.append)
            sealed = service.keys if isinstance(service.keys, SealedKeySource) else None
            inner = sealed.inner if sealed is not None else service.keys
            cached = inner if isinstance(inner, CachingKeySource) else None
            request = spec.to_request(known, owner=owner_of(namespace, name))  # loads are recorded as ours
            result = service.unlock(request, run.report)
            if sealed is not None and not result.fast_path:
                sealed.keep()  # verified: only now is its sealed key worth keeping
        except UnlockError as exc:
            if cached is not None:
                cached.failed(permanent=not exc.transient)
            if sealed is not None:
                sealed.failed(exc)  # a sealed key that did not unlock is not kept
            return run.failed(exc, attempt)
        except Exception as exc:  # a bug or an unforeseen library error: retry, say little
            if cached is not None:
                cached.failed(permanent=False)
            log.exception("unexpected error reconciling %s/%s", namespace, name)
            return run.failed(InternalError(f"unexpected {type(exc).__name__}; see the operator log"), attempt)
        if cached is not None:
            cached.succeeded()  # the key loaded verified images: kept from now (if one was used)
        unlocked_at = None if result.fast_path else st.now_rfc3339()
        if not result.fast_path:
            runtime = self.runtime.name
            metrics.UNLOCK_DURATION.labels(runtime).observe(time.monotonic() - started)
            metrics.LOADED_BYTES.labels(runtime).inc(result.archive_bytes)
        how = "already present" if result.fast_path else "loaded"
        ready = st.mark_ready(
            run.entry,
            "AlreadyPresent" if result.fast_path else "Unlocked",
            f"{len(result.images)} image(s) {how} and verified",
            generation,
        ).model_copy(
            update={
                "images": [Image(name=ref, id=image_id) for ref, image_id in result.images.items()],
                "images_digest": None,
                "progress": None,  # done: the summary says 100%
                **({"last_unlock_time": unlocked_at} if unlocked_at else {}),
            }
        )
        try:
            run.write(_handled(ready, body))
        except UnlockError as exc:  # the images are fine; the record of it is not yet
            return run.failed(exc, attempt)
        if not result.fast_path or entry.phase not in (None, Phase.READY):
            how = "loaded and verified" if not result.fast_path else "already present"
            run.event(
                "Normal",
                "Unlocked" if not result.fast_path else "AlreadyPresent",
                f"{len(result.images)} image(s) {how} at version {spec.version}",
            )
        self.reclaim(run, body, list(result.images) if result.fast_path else [])
        return Outcome(Verdict.READY, "ready")

    def reclaim(self, run: _Reconciliation, body: Mapping[str, Any], found: list[str]) -> None:
        """Now that this version is Ready here (never before): images ``found`` already there
        are pinned again (a rollback to a version an earlier reclaim unpinned), and earlier
        versions' images get the spec's reclaimPolicy. A failure leaves them for the next
        sweep (agent/reclaim.py)."""
        if self.reclaimer is None:
            return
        try:
            if found and (pinned := self.runtime.pin(found)):
                log.info("%s/%s: pinned %d image(s) found unpinned", run.namespace, run.name, len(pinned))
            if (entry := self.reclaimer.after_ready(body, run.entry)) is not None:
                run.write(entry)
        except UnlockError as exc:
            log.info("reclaim for %s/%s postponed to the next sweep: %s", run.namespace, run.name, exc.message)


class _Reconciliation:
    """State of one reconciliation: this node's entry as last written, and a throttle."""

    def __init__(
        self, owner: Reconciler, body: Mapping[str, Any], entry: NodeEntry, namespace: str, name: str, generation: int
    ) -> None:
        self.owner, self.body, self.entry = owner, body, entry
        self.namespace, self.name, self.generation = namespace, name, generation
        self.throttle = st.Throttle(owner.settings.progress_interval)
        self.phase: Phase | None = None
        self.started = False  # the Unlocking event is posted
        self.decrypted = 0  # bytes counted in imageunlock_bytes_decrypted_total
        # A re-check of this generation's Stalled outcome stays quiet (no status write, no
        # event) until the resource API has accepted the credentials: a re-check that fails
        # the same way again costs one write (lastHandledRequestedAt) and no event on each
        # node, whatever the number of nodes and requests.
        self.stalled = (
            (entry.phase, entry.observed_generation) == (Phase.FAILED, generation),
            entry.reason,
            entry.message,
        )
        self.quiet = self.stalled[0]
        # The Secret resourceVersion whose login was refused in this run (its own, or the
        # verdict of another node it adopted): recorded in the Stalled entry, for the others.
        self.refused: list[str] = []

    def write(self, entry: NodeEntry) -> None:
        if not self.refused:  # a verdict holds only while the entry says the login was refused
            entry = entry.model_copy(update={"login_refused_version": None})
        self.owner.entries.apply(self.body, entry)
        self.entry = entry

    def event(self, type_: str, reason: str, message: str) -> None:
        """A state change: an Event on the object and one log line (WARNING for a failure)."""
        where = f"node {self.owner.entries.node}: " if self.owner.entries.node else ""
        self.owner.kube.post_event(self.body, type_, reason, where + message)
        level = logging.WARNING if type_ == "Warning" else logging.INFO
        log.log(
            level, "%s/%s: %s", self.namespace, self.name, message, extra=logs.fields(self.namespace, self.name, reason)
        )

    def report(self, phase: Phase, message: str, done: int, total: int) -> None:
        self.phase = phase
        if phase == Phase.PENDING and not total:
            return  # the fast-path check: not worth a status write or an event on its own
        if self.quiet and phase in (Phase.PENDING, Phase.AUTHENTICATING):
            return
        self.quiet = False
        if not self.started:  # the first step of a real unlock (hashing the archive, or logging in)
            self.started = True
            self.event("Normal", "Unlocking", "images not present: unlocking the archive")
        if phase == Phase.LOADING and done > self.decrypted:
            metrics.DECRYPTED_BYTES.labels(self.owner.runtime.name).inc(done - self.decrypted)
            self.decrypted = done
        if self.throttle.ready(phase, final=bool(total) and done >= total):
            working = st.mark_reconciling(self.entry, phase, phase.value, message, self.generation)
            percent = min(100, done * 100 // total) if total else 0
            self.write(
                working.model_copy(update={"progress": Progress(bytes_done=done, bytes_total=total, percent=percent)})
            )

    def failed(self, exc: UnlockError, attempt: int) -> Outcome:
        metrics.FAILURES.labels(exc.reason).inc()
        if exc.transient:
            delay = self.owner.jitter(attempt, self.owner.settings.retry_base, self.owner.settings.retry_max)
            text = f"attempt {attempt + 1} failed: {exc.message}; retrying in {delay:.0f}s"
            self.write_or_log(
                st.mark_reconciling(self.entry, self.phase or Phase.PENDING, exc.reason, text, self.generation)
            )
            self.event("Warning", exc.reason, exc.message)  # repeats aggregate: the attempt is in status
            return Outcome(Verdict.RETRY, exc.message, exc.reason, delay)
        refused = self.refused[-1] if self.refused else None
        if self.quiet and self.stalled[1:] == (exc.reason, exc.message) and self.entry.login_refused_version == refused:
            # The same Stalled outcome again: record only the request it answered, if any.
            requested = _requested_at(self.body)
            if requested is not None and self.write_or_log(
                self.entry.model_copy(update={"last_handled_requested_at": requested})
            ):
                log.debug("%s/%s re-checked: unchanged (%s)", self.namespace, self.name, exc.reason)
            return Outcome(Verdict.STALLED, exc.message, exc.reason)
        stalled = st.mark_stalled(self.entry, exc.reason, exc.message, self.generation).model_copy(
            update={"login_refused_version": refused}
        )
        if not self.write_or_log(_handled(stalled, self.body)):
            # Unrecorded, a Stalled verdict would never be seen: retry until it can be written.
            delay = self.owner.jitter(attempt, self.owner.settings.retry_base, self.owner.settings.retry_max)
            return Outcome(Verdict.RETRY, exc.message, exc.reason, delay)
        self.event("Warning", exc.reason, exc.message)
        return Outcome(Verdict.STALLED, exc.message, exc.reason)

    def write_or_log(self, entry: NodeEntry) -> bool:
        """Write a failure's entry; if the API server refuses that too, log it and go on (the
        verdict still reaches the resync loop, which retries with backoff)."""
        try:
            self.write(entry)
        except UnlockError as exc:
            log.warning("status of %s/%s not written: %s", self.namespace, self.name, exc.message)
            return False
        return True


def _requested_at(body: Mapping[str, Any]) -> str | None:
    requested = ((body.get("metadata") or {}).get("annotations") or {}).get(REQUESTED_AT)
    return None if requested is None else str(requested)


def _handled(entry: NodeEntry, body: Mapping[str, Any]) -> NodeEntry:
    """``entry`` after a finished check: when, and which re-check request it answered."""
    handled: dict[str, Any] = {"last_verified_time": st.now_rfc3339()}
    if (requested := _requested_at(body)) is not None:
        handled["last_handled_requested_at"] = requested
    return entry.model_copy(update=handled)
