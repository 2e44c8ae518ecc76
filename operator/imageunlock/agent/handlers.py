"""The node agent's kopf layer: thin. Watch events (and changes of its Node) add an
ImageUnlock's key to a :class:`~imageunlock.workqueue.WorkQueue`; ``IMAGEUNLOCK_WORKERS``
workers take keys from it and step each on a worker thread (requests, runtime and file I/O
never block the event loop) through :class:`~imageunlock.agent.resync.Resync`, which decides
what is due (a new generation at once, re-verification every ``IMAGEUNLOCK_VERIFY_INTERVAL``,
retries with backoff, Stalled ones when their inputs change) and when to look next: the key
is added again after that delay. The queue hands a key to one worker at a time; a step that
fails is tried again after the queue's per-key backoff with jitter.

Level-triggered on purpose: no kopf change handlers, so kopf keeps no per-handler state in
the object's annotations (hundreds of agents would overwrite each other's) and adds no
finalizer (deleting an ImageUnlock never waits for an agent: its images get its
reclaimPolicy when the agent sees the deletion, or at the next sweep, agent/reclaim.py). A liveness
probe reports whether the container runtime answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

import kopf

from imageunlock import metrics
from imageunlock.agent.node import NodeAgent, counted, resolve_runtime
from imageunlock.agent.reclaim import Reclaimer
from imageunlock.agent.reconciler import Reconciler
from imageunlock.agent.resync import Resync
from imageunlock.agent.secrets import SecretKey, SecretWatches, waits_for_secret
from imageunlock.app import hardening
from imageunlock.app.config import AgentConfig
from imageunlock.app.kopfrun import new_registry, read_config, serve, tune
from imageunlock.engine import runtimes
from imageunlock.engine.reclaim import parse_policy
from imageunlock.errors import ConfigurationError, UnlockError, reasons
from imageunlock.kube.client import GROUP, PLURAL, VERSION, KubernetesApi
from imageunlock.kube.conditions import condition_states
from imageunlock.kube.nodes import NodeInfo
from imageunlock.workqueue import WorkQueue

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, PLURAL)
RUNTIME_DOWN_RESTART = 120.0  # seconds of an unreachable runtime before liveness fails


registry = new_registry()


def run() -> int:
    """``imageunlock agent``: the settings (a bad one: exit 1), then the agent's operator."""
    config = read_config(AgentConfig.from_env)
    if config is None:
        return 1
    # Keys may be kept in this process's memory (spec.keyCacheSeconds): no core dumps, no
    # ptrace or /proc/<pid>/mem by other processes of its user.
    hardening.non_dumpable()
    return serve(config, registry)


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
    memo.runtime = runtimes.make_runtime(runtime, timeout=config.runtime_timeout, **config.runtime_settings)
    memo.agent = NodeAgent(memo.kube, node, runtime, NodeInfo.from_object(raw) if raw else None)
    memo.objects = {}
    # list() of a dict's values runs without releasing the GIL: a consistent snapshot even
    # while the event loop updates the dict.
    # Keys (namespace, name) due a step; touched on the event loop only (not thread-safe).
    memo.queue = WorkQueue(base=1.0, cap=60.0)
    # The Node through a watch (a field selector on its name): an idle agent reads nothing.
    memo.stop = threading.Event()
    loop = asyncio.get_running_loop()

    def node_changed(raw: dict[str, Any] | None) -> None:
        # labels decide every selection; a DiskPressure that cleared lets a held import start now
        if memo.agent.observe(raw):
            loop.call_soon_threadsafe(_all_changed, memo)

    memo.reclaimer = await asyncio.to_thread(
        Reclaimer,
        memo.runtime,
        memo.kube,
        node,
        memo.agent.entry,
        known=lambda: list(memo.objects.values()),
        owners=config.image_owners,
    )
    memo.deleted = {}  # (namespace, name) -> the reclaimPolicy of a deleted object, until its step
    memo.reconciler = Reconciler(
        config,
        memo.runtime,
        memo.kube,
        memo.agent,
        others=lambda: list(memo.objects.values()),
        disk_pressure=memo.agent.disk_pressure,
        reclaimer=memo.reclaimer,
        may_cache_keys=hardening.protected(),  # a dumpable process keeps no key (run() tried)
    )
    memo.resync = Resync(memo.reconciler)
    # The credentials Secret each known ImageUnlock waits for (or holds a kept key of), and a
    # metadata-only watch on each (at most MAX_WATCHES): a created or changed Secret re-checks
    # its ImageUnlocks at once, and revokes the keys kept from it.
    memo.secret_of = {}

    def secret_changed(secret: SecretKey) -> None:
        loop.call_soon_threadsafe(_secret_changed, memo, secret)

    def secret_began(secret: SecretKey) -> None:
        loop.call_soon_threadsafe(_look_at, memo, secret)

    memo.secrets = SecretWatches(memo.kube.follow_secret, secret_changed, began=secret_began)
    # Only now, with everything its reports touch in place: a Node report during the awaits
    # above found no memo.secrets (seen in CI: AttributeError in _all_changed).
    memo.node_watch = threading.Thread(
        target=memo.kube.follow_node, args=(node, node_changed, memo.stop), name="node-watch", daemon=True
    )
    memo.node_watch.start()
    memo.workers = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="reconcile")
    memo.tasks = [asyncio.create_task(_worker(memo)) for _ in range(config.workers)]
    memo.tasks.append(asyncio.create_task(_ping_loop(memo)))
    memo.tasks.append(asyncio.create_task(_sweep_loop(memo)))
    metrics.prepare_agent(node, runtime, reasons())
    memo.metrics_server = (
        await asyncio.to_thread(metrics.serve, config.metrics_address) if config.metrics_address else None
    )
    where = ", ".join(f"{s.key} {config.runtime_settings[s.key]}" for s in runtimes.runtime_kind(runtime).settings)
    log.info(
        "agent on node %s: archive roots %s, runtime %s (%s), verify every %ss",
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
    if getattr(memo, "secrets", None) is not None:
        memo.secrets.stop()
    for task in getattr(memo, "tasks", []):
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
    """Keep a snapshot per ImageUnlock and queue its key (a deleted one's too: its step drops
    what is kept for it). Async on purpose: it only touches a dict and the queue, and running
    it on the event loop keeps every mutation of both on the thread that reads them."""
    meta = body.get("metadata", {})
    key = (meta.get("namespace"), meta.get("name"))
    before = memo.secret_of.get(key)
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
        memo.objects.pop(key, None)
        if getattr(memo, "reclaimer", None) is not None:
            memo.deleted[key] = parse_policy((body.get("spec") or {}).get("reclaimPolicy"))
        memo.secret_of.pop(key, None)
    else:
        memo.objects[key] = _snapshot(body)
        memo.secret_of[key] = _secret_of(memo, memo.objects[key])
        entry = memo.agent.entry(memo.objects[key])
        metrics.observe_node(*key, memo.agent.node, None if entry.phase is None else condition_states(entry))
    memo.queue.add(key)
    if memo.secret_of.get(key) != before:  # only then can the set of followed Secrets change
        _follow_secrets(memo)


def _all_changed(memo: Any) -> None:
    for key in memo.objects:
        memo.queue.add(key)
        memo.secret_of[key] = _secret_of(memo, memo.objects[key])  # the Node's labels: selection
    _follow_secrets(memo)


def _secret_of(memo: Any, body: dict[str, Any]) -> SecretKey | None:
    """The credentials Secret to follow for an ImageUnlock, in its own namespace (the only one
    its credentials may come from): only if this node serves it and either its entry here
    waits for the Secret (Stalled or retrying on credentials or a missing Secret) or a key
    fetched with it is kept (its change must revoke the key at once). None otherwise: it names
    none, its spec does not parse, it does not select this node, or it is Ready (or not yet
    tried: its first step reads the Secret, and a failure there is reported in its status,
    whose event recomputes this). Before the Node's watch has reported, selection is unknown
    and every object counts (reading the Node here would block the event loop); that report
    recomputes every object's (_all_changed)."""
    agent: NodeAgent = memo.agent
    if agent.watched and agent.selected(body) is False:
        return None
    try:
        name = memo.reconciler.parse(body).key_source.secret_name
    except UnlockError:
        return None
    if not name:
        return None
    namespace = str(body["metadata"].get("namespace") or "")
    if waits_for_secret(agent.entry(body)) or memo.reconciler.keeps_keys(namespace, name):
        return (namespace, name)
    return None


def _refresh_secrets(memo: Any) -> None:
    """Recompute which Secrets are followed (a kept key expired, say), queueing nothing."""
    for key, body in list(memo.objects.items()):
        memo.secret_of[key] = _secret_of(memo, body)
    _follow_secrets(memo)


def _follow_secrets(memo: Any) -> None:
    """Watch exactly the Secrets of the ImageUnlocks this node serves."""
    memo.secrets.sync({secret for secret in memo.secret_of.values() if secret is not None})


def _secret_changed(memo: Any, secret: SecretKey) -> None:
    """A followed Secret was created, changed or deleted: the keys fetched with it are dropped
    (a rotation revokes them now) and its ImageUnlocks are looked at now."""
    memo.reconciler.secret_changed(*secret)
    _look_at(memo, secret)


def _look_at(memo: Any, secret: SecretKey) -> None:
    """The ImageUnlocks waiting for ``secret`` are re-checked at their next step, queued now."""
    for key, named in list(memo.secret_of.items()):
        if named == secret:
            memo.resync.poke(key)
            memo.queue.add(key)


def _snapshot(body: Any) -> dict[str, Any]:
    return {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status")}


async def _ping_loop(memo: kopf.Memo) -> None:
    """Keeps imageunlock_runtime_reachable current; not on the workers, so a long unlock on
    each of them does not hold it up."""
    while True:
        memo.reconciler.key_cache.purge()  # kept keys whose window closed go, even unasked
        _refresh_secrets(memo)  # and the watches that only revoked them
        await asyncio.to_thread(_check_runtime, memo)
        await asyncio.sleep(min(30.0, memo.settings.verify_interval))


async def _sweep_loop(memo: kopf.Memo) -> None:
    """At start-up and every verify interval: images of deleted ImageUnlocks (a delete this
    agent missed, or one while it was down) and superseded ones a reclaim left (Reclaimer.sweep)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.run_in_executor(memo.workers, memo.reclaimer.sweep)
        except UnlockError as exc:
            log.info("reclaim sweep postponed: %s", exc.message)
        except Exception:  # a bug: logged, and tried again next interval
            log.exception("reclaim sweep failed")
        await asyncio.sleep(memo.settings.verify_interval)


async def _worker(memo: kopf.Memo) -> None:
    queue: WorkQueue[tuple[str, str]] = memo.queue
    while True:
        await _handle(memo, await queue.get())


async def _handle(memo: kopf.Memo, key: tuple[str, str]) -> None:
    """One step of a key the queue handed out, on a worker thread; then its next look is
    queued (a step that failed: after the key's backoff, which a success resets)."""
    queue: WorkQueue[tuple[str, str]] = memo.queue
    loop = asyncio.get_running_loop()
    try:
        next_look = await loop.run_in_executor(memo.workers, _step, memo, key, memo.objects.get(key))
    except UnlockError as exc:  # e.g. the API server is away
        log.info("%s/%s not handled now: %s; again in %.1fs", *key, exc.message, queue.add_rate_limited(key))
    except Exception:  # a bug: logged, and tried again all the same
        log.exception("handling %s/%s failed; again in %.1fs", *key, queue.add_rate_limited(key))
    else:
        queue.forget(key)
        if next_look is not None:
            queue.add_after(key, next_look)
    finally:
        queue.done(key)


def _step(memo: Any, key: tuple[str, str], body: dict[str, Any] | None) -> float | None:
    """One object on a worker thread: reconcile what is due, or leave it; the seconds until
    its next look (None: when it or the Node changes). A deleted object (None): drop what is
    kept for it, here, where no step of it can run at the same time."""
    agent: NodeAgent = memo.agent
    resync: Resync = memo.resync
    reclaimer: Reclaimer | None = getattr(memo, "reclaimer", None)
    if body is None:
        memo.reconciler.release_keys(*key, None)  # its kept keys go with it, now
        if reclaimer is not None and key in memo.deleted:  # its images here (no finalizer: deletion is instant)
            reclaimer.deleted(*key, memo.deleted[key])
            memo.deleted.pop(key, None)
        resync.forget(key)
        agent.forget(key)
        metrics.forget_node(*key, agent.node)
        return None
    if reclaimer is not None:
        reclaimer.seen(body)  # its policy outlives it (a delete while the agent is down)
    selected = agent.selected(body)
    if selected is None:
        return None  # this node was never read: nothing is known, nothing is removed
    if not selected:
        memo.reconciler.release_keys(*key, None)  # not this node's any more: nor are its keys
        if agent.has_entry(key, body):
            log.info("%s/%s no longer selects node %s: removing its entry", *key, agent.node)
            agent.leave(*key)
            resync.forget(key)
        return None
    new = agent.entry(body).observed_generation != (body.get("metadata") or {}).get("generation")
    if new and not counted(body):
        return None  # the controller has not counted this generation's nodes yet (at most MAX_NODES)
    return resync.step(key, body)
