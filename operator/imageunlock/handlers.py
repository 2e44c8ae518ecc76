"""kopf handlers: thin. Parse, reconcile in a worker thread, classify the outcome.

* create / resume / spec update → :meth:`Reconciler.reconcile` (sync handler: kopf runs it
  in its thread pool, so requests, docker and file I/O never block the event loop);
* an ``on.event`` handler keeps a snapshot of every ImageUnlock, and a background task hands
  them to :class:`~imageunlock.resync.Resync`, which re-verifies Ready ones every
  ``IMAGEUNLOCK_VERIFY_INTERVAL`` seconds, retries its own transient failures when due and
  re-checks Stalled ones when their inputs change. Not a ``kopf.timer``: timers force a
  finalizer, and a finalizer makes deletion hang whenever the operator is down. With no
  finalizer, deleting an ImageUnlock never waits for us (the loaded images stay in the runtime);
* a liveness probe reports whether the container runtime answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

import kopf

from . import metrics
from .config import OperatorConfig
from .errors import UnlockError
from .kube import GROUP, PLURAL, VERSION, KubernetesApi
from .reconciler import Reconciler, Verdict
from .resync import Resync
from .runtimes import make_runtime

log = logging.getLogger(__name__)
RESOURCE = (GROUP, VERSION, PLURAL)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config = OperatorConfig.from_env()
    # kopf's bookkeeping goes to annotations under our group; status stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    # Our own events mark transitions; kopf would post a second one per failure (type Error,
    # reason Logging) from its handler-failure log lines, whatever the posting level.
    settings.posting.enabled = False
    settings.execution.max_workers = config.workers
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    memo.settings = config
    memo.runtime = make_runtime(
        config.runtime,
        docker_host=config.docker_host,
        containerd_address=config.containerd_address,
        containerd_namespace=config.containerd_namespace,
        timeout=config.runtime_timeout,
    )
    memo.kube = await asyncio.to_thread(KubernetesApi)  # reads kubeconfig / service-account files
    memo.objects = {}
    # list() of a dict's values runs without releasing the GIL: a consistent snapshot even
    # while the event loop updates the dict.
    memo.reconciler = Reconciler(config, memo.runtime, memo.kube, others=lambda: list(memo.objects.values()))
    memo.resync = Resync(memo.reconciler)
    memo.verifier = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reverify")
    memo.reverify_task = asyncio.create_task(_reverify_loop(memo))
    memo.metrics_server = (
        await asyncio.to_thread(metrics.serve, config.metrics_address) if config.metrics_address else None
    )
    where = (
        config.docker_host
        if config.runtime == "docker"
        else f"{config.containerd_address}, namespace {config.containerd_namespace}"
    )
    log.info(
        "operator settings: archive roots %s, runtime %s at %s, verify every %ss",
        ":".join(config.archive_roots),
        config.runtime,
        where,
        config.verify_interval,
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = getattr(memo, "reverify_task", None)
    if task is not None:
        task.cancel()
    if getattr(memo, "verifier", None) is not None:
        memo.verifier.shutdown(wait=False, cancel_futures=True)
    if getattr(memo, "runtime", None) is not None:
        await asyncio.to_thread(memo.runtime.close)
    if getattr(memo, "kube", None) is not None:
        await asyncio.to_thread(memo.kube.close)
    if getattr(memo, "metrics_server", None) is not None:
        await asyncio.to_thread(memo.metrics_server.shutdown)


@kopf.on.probe(id="runtime")
def runtime_probe(memo: kopf.Memo, **_: Any) -> str:
    error = _check_runtime(memo)
    return "reachable" if error is None else f"unreachable: {error.message}"


def _check_runtime(memo: kopf.Memo) -> UnlockError | None:
    """Ping the runtime; the answer also goes to imageunlock_runtime_reachable."""
    try:
        memo.runtime.ping()
    except UnlockError as exc:
        metrics.RUNTIME_REACHABLE.labels(memo.runtime.name).set(0)
        return exc
    metrics.RUNTIME_REACHABLE.labels(memo.runtime.name).set(1)
    return None


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
def reconcile(body: kopf.Body, memo: kopf.Memo, retry: int, **_: Any) -> None:
    plain = _snapshot(body)
    key = (body.metadata.namespace, body.metadata.name)
    inputs = memo.resync.inputs(plain)
    with memo.resync.lock(key):
        outcome = memo.reconciler.reconcile(plain, attempt=retry)
    memo.resync.record(key, outcome, retry, inputs, by_handler=True)
    if outcome.verdict is Verdict.STALLED:
        raise kopf.PermanentError(f"{outcome.reason}: {outcome.message}")
    if outcome.verdict is Verdict.RETRY:
        raise kopf.TemporaryError(f"{outcome.reason}: {outcome.message}", delay=outcome.delay)


@kopf.on.event(*RESOURCE)
async def track_objects(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep a snapshot per ImageUnlock for the re-verification loop. Async on purpose: it
    only touches a dict, and running it on the event loop keeps every mutation of
    ``memo.objects`` on the thread that iterates it."""
    meta = body.get("metadata", {})
    key = (meta.get("namespace"), meta.get("name"))
    if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
        memo.objects.pop(key, None)
        memo.resync.forget(key)
        metrics.forget(*key)
    else:
        memo.objects[key] = _snapshot(body)
        metrics.observe_status(*key, body.get("status"))


def _snapshot(body: Any) -> dict[str, Any]:
    return {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec", "status")}


async def _reverify_loop(memo: kopf.Memo) -> None:
    """Offer every known ImageUnlock to :class:`Resync` about once a second; it decides what
    is due (see resync.py), on one worker thread so blocking calls stay off the event loop."""
    loop = asyncio.get_running_loop()
    tick = min(1.0, memo.settings.verify_interval)
    next_ping = 0.0
    while True:
        await asyncio.sleep(tick)
        if loop.time() >= next_ping:  # keeps imageunlock_runtime_reachable current
            await loop.run_in_executor(memo.verifier, _check_runtime, memo)
            next_ping = loop.time() + min(30.0, memo.settings.verify_interval)
        for key, body in list(memo.objects.items()):
            try:
                await loop.run_in_executor(memo.verifier, memo.resync.step, key, body)
            except Exception:  # one object's trouble never stops the loop
                log.exception("re-verification of %s/%s failed", *key)
