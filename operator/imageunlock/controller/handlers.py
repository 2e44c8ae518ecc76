"""The controller: one replica writes every ImageUnlock's cluster summary.

Agents write only their own node's entry of ``status.nodes``; this role turns the entries and
the Nodes an ImageUnlock selects into the top-level kstatus conditions, phase and ``NODES``
(summary.py), and removes the entries of nodes that left the selection or were deleted (an
agent on a deleted node is gone with it). One writer for the summary, so no agent ever
races another over it, and no heartbeat writes: it acts on watch events of ImageUnlocks and
Nodes. Needs no host access: it runs as a "restricted" pod with read-only Node access.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from imageunlock import metrics
from imageunlock.app import logs
from imageunlock.app.config import ControllerConfig
from imageunlock.app.kopfrun import new_registry, read_config, serve, tune
from imageunlock.controller.summary import summarize
from imageunlock.engine.models import Phase
from imageunlock.errors import UnlockError
from imageunlock.kube.client import GROUP, PLURAL, VERSION, KubernetesApi
from imageunlock.kube.conditions import holding_reason
from imageunlock.kube.nodes import NodeInfo, Placement
from imageunlock.workqueue import WorkQueue

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, PLURAL)
MANAGER = "imageunlock-controller"
COALESCE = 0.2  # seconds a changed object waits, so a burst of entry writes is one summary
registry = new_registry()


def run() -> int:
    """``imageunlock controller``: the settings (a bad one: exit 1), then the controller."""
    config = read_config(ControllerConfig.from_env)
    return 1 if config is None else serve(config, registry)


class SummaryWriter:
    """Blocking: computes and writes one summary (run on a worker thread)."""

    def __init__(self, kube: KubernetesApi, placement: Placement) -> None:
        self.kube, self.placement = kube, placement

    def sync(self, body: Mapping[str, Any], nodes: list[NodeInfo]) -> bool:
        """Write what changed; True when something was written."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
        result = summarize(body, nodes, self.placement)
        for node in result.prune:
            log.info("%s/%s: removing the entry of node %s (not selected, or deleted)", namespace, name, node)
            self.kube.apply_node_entry(namespace, name, node, None)
        changed = {k: v for k, v in result.status.items() if status.get(k) != v}
        if changed:
            self.kube.patch_status(namespace, name, result.status, manager=MANAGER)
            _log_change(namespace, name, status, result.status)
        return bool(changed or result.prune)


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
    memo.nodes = {n.name: n for n in map(NodeInfo.from_object, await asyncio.to_thread(memo.kube.list_nodes))}
    memo.objects = {}
    memo.queue = WorkQueue(base=1.0, cap=60.0)  # keys (namespace, name) whose summary is due
    memo.writer = SummaryWriter(memo.kube, Placement(config.agent_node_selector, config.agent_tolerations))
    memo.loop_task = asyncio.create_task(_summary_loop(memo))
    memo.metrics_server = (
        await asyncio.to_thread(metrics.serve, config.metrics_address, metrics.CONTROLLER_REGISTRY)
        if config.metrics_address
        else None
    )
    log.info(
        "controller: %d node(s); agents run on nodes matching %s", len(memo.nodes), config.agent_node_selector or "all"
    )


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "loop_task", None) is not None:
        memo.loop_task.cancel()
    if getattr(memo, "kube", None) is not None:
        await asyncio.to_thread(memo.kube.close)
    if getattr(memo, "metrics_server", None) is not None:
        await asyncio.to_thread(memo.metrics_server.shutdown)


@kopf.on.event("", "v1", "nodes", registry=registry)
async def track_nodes(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A Node came, went or changed labels, taints or runtime: every summary may change."""
    name = body.get("metadata", {}).get("name")
    if event.get("type") == "DELETED":
        memo.nodes.pop(name, None)
    else:
        info = NodeInfo.from_object(dict(body))
        if memo.nodes.get(name) == info:
            return  # a heartbeat or condition update: nothing the summaries depend on
        memo.nodes[name] = info
    for key in list(memo.objects):
        memo.queue.add_after(key, COALESCE)


@kopf.on.event(*RESOURCE, registry=registry)
async def track_objects(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    meta = body.get("metadata", {})
    key = (meta.get("namespace"), meta.get("name"))
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
            if body is None:  # deleted meanwhile
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
