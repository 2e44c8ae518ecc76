"""The node agent's kopf layer: thin. It watches ImageUnlocks and hands the ones that select
its node to :class:`~imageunlock.agent.resync.Resync`, which decides what is due (a new
generation at once, re-verification every ``IMAGEUNLOCK_VERIFY_INTERVAL``, retries with
backoff, Stalled ones when their inputs change); the reconciles run on worker threads, so
requests, runtime and file I/O never block the event loop.

Level-triggered on purpose: no kopf change handlers, so kopf keeps no per-handler state in
the object's annotations (hundreds of agents would overwrite each other's) and adds no
finalizer (deleting an ImageUnlock never waits for an agent; loaded images stay). A liveness
probe reports whether the container runtime answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from typing import Any

import kopf

from imageunlock import metrics
from imageunlock.agent.node import NodeAgent, counted, resolve_runtime
from imageunlock.agent.reconciler import Reconciler
from imageunlock.agent.resync import Resync
from imageunlock.app.config import AgentConfig
from imageunlock.app.kopfrun import new_registry, read_config, serve, tune
from imageunlock.engine.runtimes import make_runtime
from imageunlock.errors import ConfigurationError, UnlockError, reasons
from imageunlock.kube.client import GROUP, PLURAL, VERSION, KubernetesApi
from imageunlock.kube.nodes import NodeInfo

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, PLURAL)
RUNTIME_DOWN_RESTART = 120.0  # seconds of an unreachable runtime before liveness fails


registry = new_registry()


def run() -> int:
    """``imageunlock agent``: the settings (a bad one: exit 1), then the agent's operator."""
    config = read_config(AgentConfig.from_env)
    return 1 if config is None else serve(config, registry)


@kopf.on.startup(registry=registry)
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = AgentConfig.from_env()  # checked before kopf started (run)
    node = str(config.node_name)
    tune(settings)
    # reads kubeconfig / service-account files; events name the node as their source
    memo.kube = await asyncio.to_thread(KubernetesApi, None, node)
    raw = await asyncio.to_thread(memo.kube.read_node, config.node_name)
    try:
        runtime = resolve_runtime(config.runtime, NodeInfo.from_object(raw) if raw else None, node)
    except ConfigurationError as exc:  # e.g. the Node is not registered yet: try again
        raise kopf.TemporaryError(exc.message, delay=5) from None
    config = config.model_copy(update={"runtime": runtime})
    memo.settings = config
    memo.runtime = make_runtime(
        runtime,
        docker_host=config.docker_host,
        containerd_address=config.containerd_address,
        containerd_namespace=config.containerd_namespace,
        timeout=config.runtime_timeout,
    )
    memo.agent = NodeAgent(memo.kube, node, runtime, NodeInfo.from_object(raw) if raw else None)
    memo.objects = {}
    # list() of a dict's values runs without releasing the GIL: a consistent snapshot even
    # while the event loop updates the dict.
    # The Node through a watch (a field selector on its name): an idle agent reads nothing.
    memo.stop = threading.Event()
    loop = asyncio.get_running_loop()

    def node_changed(raw: dict[str, Any] | None) -> None:
        memo.agent.observe(raw)
        loop.call_soon_threadsafe(_all_changed, memo)  # labels decide every selection

    memo.wake = asyncio.Event()
    memo.changed = set()  # keys with a watch event not yet offered to a worker
    memo.node_watch = threading.Thread(
        target=memo.kube.follow_node, args=(node, node_changed, memo.stop), name="node-watch", daemon=True
    )
    memo.node_watch.start()
    memo.reconciler = Reconciler(
        config,
        memo.runtime,
        memo.kube,
        others=lambda: [memo.agent.view(b) for b in list(memo.objects.values())],
        write_status=memo.agent.write,
        node=node,
    )
    memo.resync = Resync(memo.reconciler)
    memo.workers = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="reconcile")
    memo.loop_task = asyncio.create_task(_work_loop(memo))
    metrics.prepare_agent(node, runtime, reasons())
    memo.metrics_server = (
        await asyncio.to_thread(metrics.serve, config.metrics_address) if config.metrics_address else None
    )
    where = (
        config.docker_host
        if runtime == "docker"
        else f"{config.containerd_address}, namespace {config.containerd_namespace}"
    )
    log.info(
        "agent on node %s: archive roots %s, runtime %s at %s, verify every %ss",
        config.node_name,
        ":".join(config.archive_roots),
        runtime,
        where,
        config.verify_interval,
    )


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "stop", None) is not None:
        memo.stop.set()
    task = getattr(memo, "loop_task", None)
    if task is not None:
        task.cancel()
    if getattr(memo, "workers", None) is not None:
        memo.workers.shutdown(wait=False, cancel_futures=True)
    if getattr(memo, "runtime", None) is not None:
        await asyncio.to_thread(memo.runtime.close)
    if getattr(memo, "kube", None) is not None:
        await asyncio.to_thread(memo.kube.close)
    if getattr(memo, "metrics_server", None) is not None:
        await asyncio.to_thread(memo.metrics_server.shutdown)


@kopf.on.probe(id="runtime", registry=registry)
def runtime_probe(memo: kopf.Memo, **_: Any) -> str:
    """Liveness: the runtime answers. Unreachable for RUNTIME_DOWN_RESTART seconds in a row,
    the probe fails, so kubelet restarts the agent: a restarted container mounts the runtime
    socket anew (the DaemonSet mounts the socket file itself, and a restarted containerd
    creates a new one that an old mount does not see)."""
    error = _check_runtime(memo)
    if error is None:
        return "reachable"
    since = getattr(memo, "runtime_down_since", None)
    if since is not None and time.monotonic() - since >= RUNTIME_DOWN_RESTART:
        raise kopf.PermanentError(f"runtime unreachable for {RUNTIME_DOWN_RESTART:.0f}s: {error.message}")
    return f"unreachable: {error.message}"


def _check_runtime(memo: kopf.Memo) -> UnlockError | None:
    """Ping the runtime; the answer also goes to imageunlock_runtime_reachable."""
    try:
        memo.runtime.ping()
    except UnlockError as exc:
        metrics.RUNTIME_REACHABLE.labels(memo.agent.node, memo.runtime.name).set(0)
        if getattr(memo, "runtime_down_since", None) is None:
            memo.runtime_down_since = time.monotonic()
        return exc
    metrics.RUNTIME_REACHABLE.labels(memo.agent.node, memo.runtime.name).set(1)
    memo.runtime_down_since = None
    return None


@kopf.on.event(*RESOURCE, registry=registry)
async def track_objects(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep a snapshot per ImageUnlock for the work loop, and wake it. Async on purpose: it
    only touches a dict, and running it on the event loop keeps every mutation of
    ``memo.objects`` on the thread that iterates it."""
    meta = body.get("metadata", {})
    key = (meta.get("namespace"), meta.get("name"))
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
        memo.objects.pop(key, None)
        memo.resync.forget(key)
        memo.agent.forget(key)
        metrics.forget_node(*key, memo.agent.node)
    else:
        memo.objects[key] = _snapshot(body)
        memo.changed.add(key)
        metrics.observe_node(*key, memo.agent.node, memo.agent.view(memo.objects[key]).get("status"))
    memo.wake.set()


def _all_changed(memo: Any) -> None:
    memo.changed.update(memo.objects)
    memo.wake.set()


def _snapshot(body: Any) -> dict[str, Any]:
    return {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status")}


async def _work_loop(memo: kopf.Memo) -> None:
    """At once after a watch event or a finished step, else when the next look is due (at
    least a second, at most 30 s apart): offer the ImageUnlocks that changed or are due to
    :class:`Resync`, on the worker threads, one step per object at a time; remove this
    node's entry from those that no longer select it."""
    loop = asyncio.get_running_loop()
    ping_every = min(30.0, memo.settings.verify_interval)
    next_ping = 0.0
    running: dict[Any, asyncio.Future[Any]] = {}
    offered: dict[Any, float] = {}
    while True:
        sleep = min(next_ping - loop.time(), memo.resync.next_due_in(), 30.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(memo.wake.wait(), timeout=max(1.0, sleep))
        memo.wake.clear()
        # Not on the workers: a long unlock on each of them must not hold these up.
        if loop.time() >= next_ping:  # keeps imageunlock_runtime_reachable current
            await asyncio.to_thread(_check_runtime, memo)
            next_ping = loop.time() + ping_every
        # Only what changed (a watch event, the Node) or is due (a retry, a re-verification):
        # an idle agent with many ImageUnlocks wakes no worker.
        changed = set(memo.changed)
        memo.changed.clear()  # mutated, never rebound: kopf hands handlers a shallow copy of memo
        now = loop.time()
        for key, body in list(memo.objects.items()):
            if key not in changed and (not memo.resync.due_now(key) or now - offered.get(key, -1e9) < 1.0):
                continue  # unchanged, and not due (or offered within the second: at most 1 Hz)
            if key in running and not running[key].done():
                memo.changed.add(key)  # busy now: offered again once it is done
                continue
            offered[key] = now
            running[key] = loop.run_in_executor(memo.workers, _step, memo, key, body)
            running[key].add_done_callback(lambda _: memo.wake.set())  # its next look may be due sooner
        for key in [k for k, f in running.items() if f.done()]:
            running.pop(key)
        for key in [k for k in offered if k not in memo.objects]:
            offered.pop(key)  # deleted objects


def _step(memo: Any, key: tuple[str, str], body: dict[str, Any]) -> None:
    """One object on a worker thread: reconcile what is due, or leave it."""
    agent: NodeAgent = memo.agent
    try:
        selected = agent.selected(body)
        if selected is None:
            return  # this node was never read: nothing is known, nothing is removed
        if not selected:
            if agent.has_entry(key, body):
                log.info("%s/%s no longer selects node %s: removing its entry", *key, agent.node)
                agent.leave(*key)
                memo.resync.forget(key)
            return
        agent.seed(key, body)
        seen = agent.view(body)
        new = (seen.get("status") or {}).get("observedGeneration") != (body.get("metadata") or {}).get("generation")
        if new and not counted(body):
            return  # the controller has not counted this generation's nodes yet (at most MAX_NODES)
        memo.resync.step(key, seen)
    except UnlockError as exc:
        log.info("%s/%s not handled now: %s", *key, exc.message)
    except Exception:  # one object's trouble never stops the loop
        log.exception("handling %s/%s failed", *key)
