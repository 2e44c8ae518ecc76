"""Benchmark: per-node status at scale, against the real API server (writes only).

    make bench-nodes                                   # 50, 200 and 1000 nodes
    .venv/bin/python benchmarks/bench_nodes.py --nodes 5,10 --json report.json   # smoke

For each node count N: a fresh ImageUnlock (the real CRD) on the local control plane
(tools/controlplane: etcd + API server), then N simulated agents write their entry of
``status.nodes`` exactly as the agent does (``KubernetesApi.apply_node_entry``: server-side
apply, one field manager per node), 8 at a time — a Ready entry with 7 images, as after an
unlock. Then every node changes its entry once more (a re-verification's lastVerifiedTime),
one at a time, while a watch counts the events it receives. Reported per N:

* the object's size (JSON, as a GET returns it), and how much of it is managedFields;
* status-write latency, p50 and p99 (wall, the client's view), for the concurrent first
  writes and the serial second ones, and the writer's CPU per write (rusage of this process);
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
from imageunlock.kube import GROUP, KIND, PLURAL, VERSION, KubernetesApi  # noqa: E402
from imageunlock.models import DEFAULT_IMAGES  # noqa: E402
from imageunlock.nodes import DETAILED_NODES  # noqa: E402

CRD = REPO / "crds" / f"{GROUP}_{PLURAL}.yaml"
NAMESPACE = "bench"
LIMIT = int(1.5 * 1024 * 1024)  # etcd's request limit: an object must stay well below it


IMAGE_IDS = {image: "sha256:" + os.urandom(32).hex() for image in DEFAULT_IMAGES}  # one archive, every node


def entry(node: str, generation: int, verified: str, compact: bool) -> dict[str, Any]:
    """A Ready entry as an agent writes it after an unlock: 7 images with their IDs, or on a
    fleet of more than DETAILED_NODES nodes ``imagesAsSummary`` instead (nodes.py)."""
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


def measure(kube: KubernetesApi, custom: Any, nodes: int) -> dict[str, Any]:
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

    def write(node: str, verified: str) -> float:
        started = time.perf_counter()
        kube.apply_node_entry(NAMESPACE, name, node, entry(node, 1, verified, nodes > DETAILED_NODES))
        return time.perf_counter() - started

    cpu_before = cpu()
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        first = list(pool.map(lambda n: write(n, "2026-11-22T04:00:00Z"), names))
    cpu_first = cpu() - cpu_before

    # the watch: count what a watcher of ImageUnlocks receives while each node changes once
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
            events.append(event["type"])
            if stop.is_set() and len(events) >= nodes:
                w.stop()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    time.sleep(0.5)
    cpu_before = cpu()
    second = [write(n, "2026-11-22T04:05:00Z") for n in names]
    cpu_second = cpu() - cpu_before
    stop.set()
    deadline = time.monotonic() + 30
    while len(events) < nodes and time.monotonic() < deadline:
        time.sleep(0.1)

    final = custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    size = len(json.dumps(final, separators=(",", ":")))
    managed = len(json.dumps(final["metadata"].get("managedFields") or [], separators=(",", ":")))
    kept = {e["name"] for e in final.get("status", {}).get("nodes") or []}
    custom.delete_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
    return {
        "nodes": nodes,
        "compact": nodes > DETAILED_NODES,
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
        "client_cpu_ms_per_write": round(1000 * (cpu_first + cpu_second) / (2 * nodes), 2),
        "watch_events": len(events),
        "watch_events_per_change": round(len(events) / nodes, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default=os.environ.get("IU_BENCH_NODES", "50,200,1000"))
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.nodes.split(",") if n.strip()]
    with tempfile.TemporaryDirectory(prefix="iu-bench-nodes-") as work:
        plane = controlplane.ControlPlane(Path(work) / "plane").start()
        try:
            results = run(plane.kubeconfig, counts)
        finally:
            plane.stop()
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2))
    return 1 if any(r["lost"] for r in results) else 0


def run(kubeconfig: str, counts: list[int]) -> list[dict[str, Any]]:
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
        return [measure(kube, custom, n) for n in counts]
    finally:
        kube.close()


def report(results: list[dict[str, Any]]) -> None:
    print(
        "per-node status at scale (real API server; SSA, one field manager per node; 7 images per entry, "
        f"or imagesAsSummary past {DETAILED_NODES} nodes: *)"
    )
    header = ("nodes", "kept", "object", "managedF", "of 1.5MiB", "1st p50", "1st p99", "2nd p50", "2nd p99")
    print(" ".join(f"{h:>9}" for h in (*header, "cpu/write", "ev/change")))
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
            f"{r['watch_events_per_change']:.2f}",
        )
        print(" ".join(f"{c:>9}" for c in cells))
        if r["lost"]:
            print(f"  LOST entries: {r['lost'][:5]}")


if __name__ == "__main__":
    sys.exit(main())
