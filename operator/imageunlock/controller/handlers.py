"""The controller: one replica at a time writes every ImageUnlock's cluster summary.

Agents write only their own node's entry of ``status.nodes``; this role turns the entries and
the Nodes an ImageUnlock selects into the top-level kstatus conditions, phase and ``NODES``
(summary.py), and removes the entries of nodes that left the selection or were deleted (an
agent on a deleted node is gone with it). One writer for the summary, so no agent ever
races another over it, and no heartbeat writes: it acts on watch events of ImageUnlocks and
Nodes. Needs no host access: it runs as a "restricted" pod that reads Nodes and patches them
only for the readiness label (below).

Two replicas by default: both watch (their caches stay warm), only the holder of the Lease
(kube/lease.py, on a thread of its own) writes. A replica that gains the Lease queues every
object it knows; one that may have lost it writes nothing more, at once.

The leader also keeps every ImageUnlock's ``spec.readinessLabel`` on the Nodes
(controller/readiness.py): the only Node write of the operator (``patch`` on nodes), made
off the event loop like every other request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import kopf

from imageunlock import metrics
from imageunlock.app import logs
from imageunlock.app.config import ControllerConfig
from imageunlock.app.kopfrun import new_registry, read_config, serve, tune
from imageunlock.controller.readiness import foreign_claims, label_patches, managed_keys
from imageunlock.controller.summary import summarize
from imageunlock.engine.models import Phase
from imageunlock.errors import UnlockError
from imageunlock.kube.client import GROUP, PLURAL, VERSION, KubernetesApi
from imageunlock.kube.conditions import holding_reason
from imageunlock.kube.lease import KubeLeases, LeaseElector, Timing, identity
from imageunlock.kube.nodes import NodeInfo, Placement
from imageunlock.workqueue import WorkQueue

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, PLURAL)
MANAGER = "imageunlock-controller"
COALESCE = 0.2  # seconds a changed object waits, so a burst of entry writes is one summary
# At start-up the readiness labels wait (at most this long) until the watch has delivered
# every ImageUnlock listed before it: a label is never removed for an object not seen yet.
SYNC_WAIT = 30.0
LABEL_BACKOFF_CAP = 60.0  # seconds at most between two patches of a Node whose patch fails
registry = new_registry()
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def run() -> int:
    """``imageunlock controller``: the settings (a bad one: exit 1), then the controller."""
    config = read_config(ControllerConfig.from_env)
    return 1 if config is None else serve(config, registry)


class SummaryWriter:
    """Blocking: computes and writes one summary (run on a worker thread)."""

    def __init__(self, kube: KubernetesApi, placement: Placement, may_write: Callable[[], bool] = lambda: True) -> None:
        self.kube, self.placement, self.may_write = kube, placement, may_write

    def sync(self, body: Mapping[str, Any], nodes: list[NodeInfo]) -> bool:
        """Write what changed; True when something was written. Nothing more is written once
        ``may_write`` says no (leadership lost): the new leader summarises it anew."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        result = summarize(body, nodes, self.placement)
        for node in result.prune:
            if not self.may_write():
                return False
            log.info("%s/%s: removing the entry of node %s (not selected, or deleted)", namespace, name, node)
            self.kube.apply_node_entry(namespace, name, node, None)
        changed = {k: v for k, v in result.status.items() if status.get(k) != v}
        if changed and self.may_write():
            self.kube.patch_status(namespace, name, result.status, manager=MANAGER)
            _log_change(namespace, name, status, result.status)
        return bool(changed or result.prune) and self.may_write()


class LabelWriter:
    """Blocking: brings the readiness labels of every Node where the ImageUnlocks want them
    (run on a worker thread). Each Node on its own: one whose patch fails (the API server
    refuses it, or is away) is logged and waits out a backoff of its own (``retry_in``), and
    never holds up the others."""

    def __init__(
        self,
        kube: KubernetesApi,
        placement: Placement,
        may_write: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kube, self.placement, self.may_write, self.clock = kube, placement, may_write, clock
        self.ignored: set[tuple[str, str, str, str]] = set()  # foreign claims already logged
        self.backoff: dict[str, tuple[int, float]] = {}  # node -> (failures in a row, not before)

    def sync(
        self, objects: list[Mapping[str, Any]], nodes: list[NodeInfo], managed: Mapping[str, frozenset[str]]
    ) -> int:
        """Patch the Nodes whose labels are not as due (but those still in their backoff); how
        many were patched. Nothing more is written once ``may_write`` says no."""
        self._warn_foreign(objects)
        patches = label_patches(objects, nodes, self.placement, managed)
        self.backoff = {n: b for n, b in self.backoff.items() if n in patches}  # as due now, or gone
        written = 0
        for node, patch in patches.items():
            if not self.may_write():
                break
            failures, not_before = self.backoff.get(node, (0, 0.0))
            if self.clock() < not_before:
                continue
            labels = patch["metadata"].get("labels") or {}
            shown = ", ".join(f"{k}={v}" if v is not None else f"{k} removed" for k, v in labels.items())
            if labels:
                log.info("node %s: readiness label %s", node, shown)
            try:
                if self.kube.patch_node_metadata(node, patch, manager=MANAGER):
                    written += 1
            except Exception as exc:  # refused (a key the API server rejects), away, or a bug
                delay = min(LABEL_BACKOFF_CAP, 2.0 ** (failures + 1))
                self.backoff[node] = (failures + 1, self.clock() + delay)
                if isinstance(exc, UnlockError):
                    log.warning("node %s: readiness labels not written: %s; again in %.0fs", node, exc.message, delay)
                else:
                    log.exception("node %s: readiness labels failed; again in %.0fs", node, delay)
            else:
                self.backoff.pop(node, None)
        return written

    def retry_in(self) -> float | None:
        """Seconds until the first Node in backoff may be patched again; None: none waits."""
        if not self.backoff:
            return None
        return max(0.0, min(not_before for _, not_before in self.backoff.values()) - self.clock())

    def _warn_foreign(self, objects: list[Mapping[str, Any]]) -> None:
        """One WARNING per ImageUnlock that names a key another namespace owns, when it starts
        to (the controller posts no Events: its RBAC has none)."""
        claims = set(foreign_claims(objects))
        for namespace, name, key, owner in sorted(claims - self.ignored):
            log.warning(
                "%s/%s: spec.readinessLabel %s is ignored: the key belongs to namespace %s (its oldest "
                "ImageUnlock naming it); choose a key under a prefix your team owns",
                namespace,
                name,
                key,
                owner,
                extra=logs.fields(namespace, name, "ReadinessLabelTaken"),
            )
        self.ignored = claims


def _log_change(namespace: str, name: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> None:
    """One line per change of the cluster verdict (phase or reason), never per write: Ready at
    INFO, Stalled at WARNING, the rest (working) at INFO."""
    old = (before.get("phase"), holding_reason(before.get("conditions")))
    new = (after.get("phase"), holding_reason(after.get("conditions")))
    if old == new:
        return
    phase, reason = new
    level = logging.WARNING if phase == Phase.FAILED.value else logging.INFO
    ready = after.get("readyNodes") or before.get("readyNodes") or "-"
    text = f"{phase} ({ready} nodes ready): {after.get('message', '')}"
    log.log(level, "%s/%s: %s", namespace, name, text, extra=logs.fields(namespace, name, reason))


@kopf.on.startup(registry=registry)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = ControllerConfig.from_env()
    tune(settings)
    memo.kube = await asyncio.to_thread(KubernetesApi)
    # Every Node before the first summary: an entry is never pruned for a Node not seen yet.
    raw_nodes = await asyncio.to_thread(memo.kube.list_nodes)
    memo.nodes = {n.name: n for n in map(NodeInfo.from_object, raw_nodes)}
    memo.managed = {str((n.get("metadata") or {}).get("name")): managed_keys(n) for n in raw_nodes}
    # Listed once, so the first readiness-label pass knows which objects the watch must
    # deliver before it may remove a label (nothing stale stays, nothing due is flapped).
    listed = await asyncio.to_thread(memo.kube.list_unlocks, config.namespaces)
    memo.awaited = {((o.get("metadata") or {}).get("namespace"), (o.get("metadata") or {}).get("name")) for o in listed}
    memo.objects = {}
    memo.queue = WorkQueue(base=1.0, cap=60.0)  # keys (namespace, name) whose summary is due
    placement = Placement(config.agent_node_selector, config.agent_tolerations)
    memo.writer = SummaryWriter(memo.kube, placement, may_write=lambda: _leading(memo))
    memo.loop_task = asyncio.create_task(_summary_loop(memo))
    memo.labeller = LabelWriter(memo.kube, placement, may_write=lambda: _leading(memo))
    memo.labels_due = asyncio.Event()
    memo.labels_due.set()  # at start-up: labels of objects deleted meanwhile go
    memo.label_task = asyncio.create_task(_label_loop(memo))
    memo.metrics_server = (
        await asyncio.to_thread(metrics.serve, config.metrics_address, metrics.CONTROLLER_REGISTRY)
        if config.metrics_address
        else None
    )
    memo.elector = None
    metrics.CONTROLLER_LEADER.set(0 if config.leader_election else 1)
    if config.leader_election:
        _elect(memo, config, asyncio.get_running_loop())
    log.info(
        "controller: %d node(s); agents run on nodes matching %s", len(memo.nodes), config.agent_node_selector or "all"
    )


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for task in ("loop_task", "label_task"):
        if getattr(memo, task, None) is not None:
            getattr(memo, task).cancel()
    if getattr(memo, "elector", None) is not None:  # it stops leading, then hands the Lease back
        memo.elector_stop.set()
        await asyncio.to_thread(memo.elector_thread.join, 15)
    if getattr(memo, "kube", None) is not None:
        await asyncio.to_thread(memo.kube.close)
    if getattr(memo, "metrics_server", None) is not None:
        await asyncio.to_thread(memo.metrics_server.shutdown)


def _elect(memo: kopf.Memo, config: ControllerConfig, loop: asyncio.AbstractEventLoop) -> None:
    """Campaign for the Lease on a thread of its own; on gaining it, summarise every object
    known (a standby's watch events were dropped while another replica led)."""
    namespace = config.lease_namespace or _own_namespace()
    timing = Timing(config.lease_duration, config.renew_deadline, config.retry_period)

    me = identity()
    # Each replica's writes carry its name (audit logs tell which replica wrote what).
    memo.kube.api_client.user_agent = f"imageunlock-controller/{me}"
    # A call may take what is left of the Lease after the renew deadline, no more.
    leases = KubeLeases(
        memo.kube.api_client, namespace, config.lease_name, config.lease_duration - config.renew_deadline
    )
    memo.elector = LeaseElector(leases, me, timing, on_change=functools.partial(_on_leadership, memo, loop))
    memo.elector_stop = threading.Event()
    memo.elector_thread = threading.Thread(
        target=memo.elector.run, args=(memo.elector_stop,), name="leader-election", daemon=True
    )
    memo.elector_thread.start()
    log.info("controller %s: leader election on Lease %s/%s", memo.elector.identity, namespace, config.lease_name)


def _on_leadership(memo: kopf.Memo, loop: asyncio.AbstractEventLoop, leading: bool) -> None:
    """On the elector's thread: the gauge, and every known object queued when leading."""
    metrics.CONTROLLER_LEADER.set(1 if leading else 0)
    if leading:
        loop.call_soon_threadsafe(_queue_all, memo)


def _own_namespace() -> str:
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"  # outside a cluster


def _leading(memo: kopf.Memo) -> bool:
    elector = getattr(memo, "elector", None)
    return elector is None or bool(elector.is_leader())


def _queue_all(memo: kopf.Memo) -> None:
    for key in list(memo.objects):
        memo.queue.add(key)
    memo.labels_due.set()


@kopf.on.probe(id="leader", registry=registry)
def leader_probe(memo: kopf.Memo, **_: Any) -> bool:
    """In the liveness answer (``{"leader": true}``; kopf caches it up to 10 s), which is 200
    for a standby too: a standby is healthy, and ready to take over."""
    return _leading(memo)


@kopf.on.event("", "v1", "nodes", registry=registry)
async def track_nodes(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Node came, went or changed labels, taints or runtime: every summary may change."""
    name = body.get("metadata", {}).get("name")
    if event.get("type") == "DELETED":
        memo.nodes.pop(name, None)
        memo.managed.pop(name, None)
    else:
        info = NodeInfo.from_object(dict(body))
        managed, known = managed_keys(dict(body)), memo.nodes.get(name)
        if known is None or known.labels != info.labels or memo.managed.get(name) != managed:
            memo.labels_due.set()
        memo.managed[name] = managed
        if known == info:
            return  # a heartbeat or condition update: nothing the summaries depend on
        memo.nodes[name] = info
    for key in list(memo.objects):
        memo.queue.add_after(key, COALESCE)


@kopf.on.event(*RESOURCE, registry=registry)
async def track_objects(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body.get("metadata", {})
    key = (meta.get("namespace"), meta.get("name"))
    memo.awaited.discard(key)
    memo.labels_due.set()  # an entry turned Ready or not, the version or selection changed, or it is gone
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
        memo.objects.pop(key, None)
        metrics.forget_summary(*key)
        return
    memo.objects[key] = {k: body.get(k) for k in ("metadata", "spec", "status")}
    metrics.observe_summary(*key, body.get("status"))  # the summary as stored: the cluster truth
    memo.queue.add_after(key, COALESCE)


async def _summary_loop(memo: kopf.Memo) -> None:
    """Summarise the objects that changed, one key at a time from the work queue: a burst of
    watch events (many agents reporting at once) is one summary write (the key waits
    COALESCE seconds, and adds meanwhile fold into it), a key is never summarised twice at
    once, and a failed summary is retried with per-key backoff and jitter, never dropped."""
    queue: WorkQueue[tuple[str, str]] = memo.queue
    while True:
        key = await queue.get()
        try:
            body = memo.objects.get(key)
            if body is None or not _leading(memo):  # deleted meanwhile, or a standby (queued anew when it leads)
                queue.forget(key)
                continue
            try:
                await asyncio.to_thread(memo.writer.sync, body, list(memo.nodes.values()))
            except UnlockError as exc:  # the API server is away: again, after a backoff
                delay = queue.add_rate_limited(key)
                log.warning("summary of %s/%s not written: %s; again in %.1fs", *key, exc.message, delay)
            except Exception:  # a bug: logged, and retried all the same (never dropped)
                delay = queue.add_rate_limited(key)
                log.exception("summary of %s/%s failed; again in %.1fs", *key, delay)
            else:
                queue.forget(key)
        finally:
            queue.done(key)


async def _label_loop(memo: kopf.Memo) -> None:
    """Keep the readiness labels (controller/readiness.py) as due: after any change of an
    ImageUnlock or a Node's labels, coalesced, on a worker thread; a Node whose patch failed
    is tried again after its own backoff (LabelWriter), a failed pass after one. Only the
    leader writes (a standby's pass is skipped: it runs one when it gains the Lease)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SYNC_WAIT
    while memo.awaited and loop.time() < deadline:
        await asyncio.sleep(COALESCE)
    failures = 0
    while True:
        await memo.labels_due.wait()
        await asyncio.sleep(COALESCE)
        memo.labels_due.clear()
        if not _leading(memo):
            continue
        try:
            objects, nodes = list(memo.objects.values()), list(memo.nodes.values())
            await asyncio.to_thread(memo.labeller.sync, objects, nodes, dict(memo.managed))
            if (wait := memo.labeller.retry_in()) is not None:  # nodes whose patch failed
                loop.call_later(wait, memo.labels_due.set)
        except Exception as exc:  # a bug: again after a backoff (a Node's failure is its own)
            failures += 1
            delay = min(60.0, 2.0**failures)
            if isinstance(exc, UnlockError):
                log.warning("readiness labels not written: %s; again in %.0fs", exc.message, delay)
            else:
                log.exception("readiness labels failed; again in %.0fs", delay)
            loop.call_later(delay, memo.labels_due.set)
        else:
            failures = 0
