"""Benchmark: per-node status at scale, against the real API server (writes only).

    make bench-nodes                                   # 50, 200 and 1000 nodes
    .venv/bin/python benchmarks/bench_nodes.py --nodes 5,10 --json report.json   # smoke

For each node count N: a fresh ImageUnlock (the real CRD) on the local control plane
(tools/controlplane: etcd + API server), then N simulated agents write their entry of
``status.nodes`` exactly as the agent does (``KubernetesApi.apply_node_entry``: server-side
apply, one field manager per node), ``--writers`` (4) at a time — a Ready entry with 7 images, as after an
unlock. Then nodes change their entry once more (a re-verification's lastVerifiedTime), one
at a time — every node up to 100, an even sample of 100 beyond — while a watch counts the
events it receives. Reported per N:

* the object's size (JSON, as a GET returns it), and how much of it is managedFields;
* status-write latency, p50 and p99 (wall, the client's view, retries included), for the
  concurrent first writes and the serial second ones; CPU per write of the writer (rusage of
  this process) and of the API server (/proc), and how many writes needed a retry;
* watch events per entry change (every watcher of ImageUnlocks receives them);
* whether all N entries are there (none lost to concurrent writers).

It never asserts timings; the exit status is non-zero only when something failed (an entry
lost, a write refused).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import kubernetes  # noqa: E402

import controlplane  # noqa: E402
from benchmarks.measure import proc_cpu  # noqa: E402
from imageunlock.defaults import DEFAULT_IMAGES  # noqa: E402
from imageunlock.errors import KubernetesUnavailableError  # noqa: E402
from imageunlock.kube.client import GROUP, KIND, PLURAL, VERSION, KubernetesApi  # noqa: E402
from imageunlock.kube.nodes import DETAILED_NODES  # noqa: E402

CRD = REPO / "crds" / f"{GROUP}_{PLURAL}.yaml"
NAMESPACE = "bench"
LIMIT = int(1.5 * 1024 * 1024)  # etcd's request limit: an object must stay well below it
SAMPLE = 100  # second-pass writes per node count


IMAGE_IDS = {image: "sha256:" + os.urandom(32).hex() for image in DEFAULT_IMAGES}  # one archive, every node


def entry(node: str, generation: int, verified: str, compact: bool) -> dict[str, Any]:
    """A Ready entry as an agent writes it after an unlock: 7 images with their IDs, or on a
    fleet of more than DETAILED_NODES nodes ``imagesAsSummary`` instead (kube/nodes.py)."""
    images = (
        {"imagesAsSummary": True}
        if compact
        else {"images": [{"name": f"{i}:1.4.2", "id": d} for i, d in IMAGE_IDS.items()]}
    )
    return {
        "name": node,
        "runtime": "containerd",
        "phase": "Ready",
        "reason": "Unlocked",
        "message": "7 image(s) loaded and verified",
        "observedGeneration": generation,
        **images,
        "lastUnlockTime": "2026-11-22T04:00:00Z",
        "lastVerifiedTime": verified,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(kube: KubernetesApi, custom: Any, nodes: int, server_pid: int | None, writers: int) -> dict[str, Any]:
    name = f"n{nodes}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "archivePath": "/var/lib/imageunlock/a.enc",
            "version": "1.4.2",
            "resourceApi": {"credentialsSecretRef": {"name": "s"}},
        },
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
    names = [f"edge-{i:04d}" for i in range(nodes)]

    retried = 0

    def write(node: str, verified: str) -> float:
        """One agent's write, retried as the agent retries a transient failure (the API
        server times out a request that keeps conflicting with concurrent applies)."""
        nonlocal retried
        started = time.perf_counter()
        for attempt in range(5):
            try:
                kube.apply_node_entry(NAMESPACE, name, node, entry(node, 1, verified, nodes > DETAILED_NODES))
                break
            except KubernetesUnavailableError:
                retried += 1
                time.sleep(0.5 * 2**attempt)
        return time.perf_counter() - started

    cpu_before, server_before = cpu(), proc_cpu(server_pid)
    with concurrent.futures.ThreadPoolExecutor(max_workers=writers) as pool:
        first = list(pool.map(lambda n: write(n, "2026-11-22T04:00:00Z"), names))
    cpu_first = cpu() - cpu_before

    # the watch: count what a watcher of ImageUnlocks receives while nodes change once each
    # (every node up to SAMPLE, then an even sample: each write costs O(N) on the server)
    sample = names[:: max(1, nodes // SAMPLE)][:SAMPLE]
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    events: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        w = kubernetes.watch.Watch()
        for event in w.stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NAMESPACE,
            PLURAL,
            field_selector=f"metadata.name={name}",
            resource_version=obj["metadata"]["resourceVersion"],
            timeout_seconds=600,
        ):
            if event["type"] == "MODIFIED":
                events.append(event["type"])
            if stop.is_set() and len(events) >= len(sample):
                w.stop()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()  # from the object's resourceVersion: no event is missed however late it connects
    cpu_before = cpu()
    second = [write(n, "2026-11-22T04:05:00Z") for n in sample]
    cpu_second = cpu() - cpu_before
    server_cpu = (proc_cpu(server_pid) or 0.0) - (server_before or 0.0)
    stop.set()
    deadline = time.monotonic() + 30
    while len(events) < len(sample) and time.monotonic() < deadline:
        time.sleep(0.1)

    final = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    size = len(json.dumps(final, separators=(",", ":")))
    managed = len(json.dumps(final["metadata"].get("managedFields") or [], separators=(",", ":")))
    kept = {e["name"] for e in final.get("status", {}).get("nodes") or []}
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    return {
        "nodes": nodes,
        "compact": nodes > DETAILED_NODES,
        "writers": writers,
        "entries_kept": len(kept),
        "lost": sorted(set(names) - kept),
        "object_bytes": size,
        "managed_fields_bytes": managed,
        "entries_bytes": len(json.dumps(final.get("status", {}).get("nodes") or [], separators=(",", ":"))),
        "of_limit_pct": round(100 * size / LIMIT, 1),
        "first_write_s": {
            "p50": percentile(first, 0.5),
            "p99": percentile(first, 0.99),
            "mean": statistics.mean(first),
        },
        "second_write_s": {
            "p50": percentile(second, 0.5),
            "p99": percentile(second, 0.99),
            "mean": statistics.mean(second),
        },
        "client_cpu_ms_per_write": round(1000 * (cpu_first + cpu_second) / (nodes + len(sample)), 2),
        "server_cpu_ms_per_write": round(1000 * server_cpu / (nodes + len(sample)), 2),
        "sampled_changes": len(sample),
        "retried_writes": retried,
        "watch_events": len(events),
        "watch_events_per_change": round(len(events) / len(sample), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default=os.environ.get("IU_BENCH_NODES", "50,200,1000"))
    parser.add_argument("--writers", type=int, default=4, help="agents writing at once in the first pass (default 4)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the plane (finally)
    with tempfile.TemporaryDirectory(prefix="iu-bench-nodes-") as work:
        plane = controlplane.ControlPlane(Path(work) / "plane").start()
        try:
            results = run(plane.kubeconfig, counts, _pid(Path(work) / "plane" / "apiserver.pid"), args.writers)
        finally:
            plane.stop()
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2))
    return 1 if any(r["lost"] for r in results) else 0


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def run(kubeconfig: str, counts: list[int], server_pid: int | None, writers: int) -> list[dict[str, Any]]:
    import subprocess

    kubectl = controlplane.kubectl_path()
    subprocess.run(
        [kubectl, "--kubeconfig", kubeconfig, "apply", "--server-side", "-f", str(CRD)], check=True, capture_output=True
    )
    subprocess.run(
        [
            kubectl,
            "--kubeconfig",
            kubeconfig,
            "wait",
            "--for=condition=Established",
            f"crd/{PLURAL}.{GROUP}",
            "--timeout=60s",
        ],
        check=True,
        capture_output=True,
    )
    client = kubernetes.config.new_client_from_config(config_file=kubeconfig)
    client.configuration.connection_pool_maxsize = 16
    kubernetes.client.CoreV1Api(client).create_namespace({"metadata": {"name": NAMESPACE}})
    kube = KubernetesApi(client)
    custom = kubernetes.client.CustomObjectsApi(client)
    try:
        return [measure(kube, custom, n, server_pid, writers) for n in counts]
    finally:
        kube.close()


def report(results: list[dict[str, Any]]) -> None:
    print(
        "per-node status at scale (real API server; SSA, one field manager per node; 7 images per entry, "
        f"or imagesAsSummary past {DETAILED_NODES} nodes: *)"
    )
    header = ("nodes", "kept", "object", "managedF", "of 1.5MiB", "1st p50", "1st p99", "2nd p50", "2nd p99")
    print(" ".join(f"{h:>9}" for h in (*header, "cpu/write", "srv/write", "retried", "ev/change")))
    for r in results:
        first, second = r["first_write_s"], r["second_write_s"]
        cells = (
            f"{r['nodes']}{'*' if r['compact'] else ''}",
            str(r["entries_kept"]),
            f"{r['object_bytes'] / 1024:.0f}Ki",
            f"{r['managed_fields_bytes'] / 1024:.0f}Ki",
            f"{r['of_limit_pct']:.1f}%",
            *(f"{1000 * t:.1f}ms" for t in (first["p50"], first["p99"], second["p50"], second["p99"])),
            f"{r['client_cpu_ms_per_write']:.1f}ms",
            f"{r['server_cpu_ms_per_write']:.1f}ms",
            str(r["retried_writes"]),
            f"{r['watch_events_per_change']:.2f}",
        )
        print(" ".join(f"{c:>9}" for c in cells))
        if r["lost"]:
            print(f"  LOST entries: {r['lost'][:5]}")


if __name__ == "__main__":
    sys.exit(main())
