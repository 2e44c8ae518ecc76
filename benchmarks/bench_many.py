"""Benchmark: many satisfied ImageUnlocks on a few agents (issue 22, item 3), against the real
API server and the real agent and controller processes.

    make bench-many                                          # 100 and 1000 resources
    .venv/bin/python benchmarks/bench_many.py --counts 5 --json report.json     # smoke

Setup (benchmarks/fleet.py): the local control plane with its audit log, one private dockerd
shared by M agents (``--agents``, 2), the controller, a loopback resource API. A seed
ImageUnlock unlocks the archive on every node first (Ready, NODES M/M). Then, per count N, N
more ImageUnlocks naming the same archive, version and images are created (4 at a time, in the
seed's namespace: a node trusts what it verified only within a namespace): the fast path,
since each node verified those IDs from that very file.
Measured from the first create until every one is Ready (``readyNodes`` M/M and the
Ready condition True, seen by a watch), then until the roles fall quiet (no request but
watches for 3 s):

* wall time to all Ready (and per object, create → Ready: p50 / p99);
* API requests by role from the audit log, by verb and resource: in all, per resource, and
  writes (patch of ``imageunlocks/status``, create/patch of events) per resource per node;
* CPU seconds of each role, the API server, etcd and dockerd (/proc/<pid>/stat deltas), per resource;
* resource API calls (key requests must stay 0 after the seed).

Targets (issue 22): 100 Ready ≤ 5 s and 1000 ≤ 60 s on 2 agents; writes per resource per
node ≤ 1; no key request after the seed. Figures are printed and compared, never asserted:
the exit status is non-zero only when something failed (not all Ready in the time limit:
1, a part did not come up: 3).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.fleet import (  # noqa: E402
    NAMESPACE,
    UNAVAILABLE,
    WRITES,
    Fleet,
    ReadyWatch,
    Unavailable,
    rate_table,
    say,
)

TARGET_READY_S = {100: 5.0, 1000: 60.0}  # on 2 agents
TARGET_WRITES_PER_RESOURCE_PER_NODE = 1.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def measure(fleet: Fleet, count: int, timeout: float) -> dict[str, Any]:
    namespace = NAMESPACE  # the seed's: what a node verified counts within one namespace
    names = [f"iu-{i:04d}" for i in range(count)]
    keys_before = fleet.key_requests()
    with ReadyWatch(fleet, namespace) as watch:
        since, cpu_before = fleet.audit_end(), fleet.cpu()
        started = time.monotonic()
        created = fleet.create_all(namespace, names)
        created_s = time.monotonic() - started
        all_ready = watch.wait(set(names), timeout)
        ready_s = (max(watch.ready.values()) if all_ready else time.monotonic()) - started
        cpu_ready = fleet.cpu()
        settle_s = fleet.quiet(since)
        cpu_after = fleet.cpu()
    made = fleet.requests(since)
    keys_after = fleet.key_requests()
    latencies = [watch.ready[n] - created[n] for n in names if n in watch.ready]

    roles = {}
    for role in fleet.roles:
        counts = made[role.name]
        writes = sum(n for (verb, resource), n in counts.items() if (verb, resource) in WRITES)
        calls = sum(n for (verb, _), n in counts.items() if verb != "watch")
        cpu_s = cpu_after[role.name] - cpu_before[role.name]
        roles[role.name] = {
            "requests": {f"{verb} {resource}": n for (verb, resource), n in sorted(counts.items())},
            "requests_total": calls,  # watches apart: a watch is one request while it lasts
            "watches": sum(n for (verb, _), n in counts.items() if verb == "watch"),
            "requests_per_resource": round(calls / count, 3),
            "writes": writes,
            "writes_per_resource": round(writes / count, 3),
            "events_created": counts[("create", "events")],
            "cpu_s": round(cpu_s, 3),
            "cpu_ms_per_resource": round(1000 * cpu_s / count, 2),
            "cpu_s_to_ready": round(cpu_ready[role.name] - cpu_before[role.name], 3),
        }
    others = {
        name: {"cpu_s": round(cpu_after[name] - cpu_before[name], 3)}
        for name in ("apiserver", "etcd", "dockerd")
        if name in cpu_after and name in cpu_before
    }
    for figures in others.values():
        figures["cpu_ms_per_resource"] = round(1000 * figures["cpu_s"] / count, 2)
    agent_roles = [name for name in roles if name.startswith("agent ")]
    per_node = max((roles[name]["writes_per_resource"] for name in agent_roles), default=0.0)
    key_delta = keys_after["key"] - keys_before["key"]
    result = {
        "resources": count,
        "agents": fleet.agents,
        "all_ready": all_ready,
        "ready_count": len(watch.ready.keys() & set(names)),
        "create_s": round(created_s, 3),
        "ready_s": round(ready_s, 3),
        "ready_latency_s": {"p50": round(percentile(latencies, 0.5), 3), "p99": round(percentile(latencies, 0.99), 3)},
        "settle_s": round(settle_s, 1),
        "roles": roles,
        "others": others,
        "agent_writes_per_resource_per_node": per_node,
        "resource_api": {
            "login": keys_after["login"] - keys_before["login"],
            "key": key_delta,
        },
    }
    result["targets"] = targets(result)
    say(f"{count}: deleting them")
    fleet.delete_all(namespace, keep=frozenset({"seed"}))
    fleet.quiet(fleet.audit_end(), still=2.0, timeout=20.0)
    return result


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    limit = TARGET_READY_S.get(r["resources"]) if r["agents"] == 2 else None
    if limit is not None:
        found.append(
            {
                "target": f"{r['resources']} resources Ready on 2 agents <= {limit:.0f} s",
                "value": r["ready_s"] if r["all_ready"] else None,
                "met": bool(r["all_ready"] and r["ready_s"] <= limit),
            }
        )
    per_node = r["agent_writes_per_resource_per_node"]
    found.append(
        {
            "target": f"writes per resource per node <= {TARGET_WRITES_PER_RESOURCE_PER_NODE:g} (agents)",
            "value": per_node,
            "met": per_node <= TARGET_WRITES_PER_RESOURCE_PER_NODE,
        }
    )
    found.append(
        {
            "target": "key requests after the seed = 0",
            "value": r["resource_api"]["key"],
            "met": not r["resource_api"]["key"],
        }
    )
    return found


def report(results: list[dict[str, Any]], seed_s: float) -> None:
    print()
    print(
        "many satisfied ImageUnlocks (fast path), real API server + controller + agents; "
        f"seed unlocked on every node in {seed_s:.1f} s"
    )
    for r in results:
        latency = r["ready_latency_s"]
        print(
            f"\nN={r['resources']} on {r['agents']} agents: "
            + (f"all Ready in {r['ready_s']:.2f} s" if r["all_ready"] else f"NOT all Ready: {r['ready_count']}")
            + f" (creates took {r['create_s']:.2f} s; create->Ready p50 {latency['p50']:.2f} s,"
            f" p99 {latency['p99']:.2f} s; quiet {r['settle_s']:.0f} s later)"
        )
        rows = [("role", "requests", "/resource", "writes", "writes/res", "events", "watches", "CPU s", "CPU ms/res")]
        for name, f in r["roles"].items():
            rows.append(
                (
                    name,
                    str(f["requests_total"]),
                    f"{f['requests_per_resource']:.2f}",
                    str(f["writes"]),
                    f"{f['writes_per_resource']:.2f}",
                    str(f["events_created"]),
                    str(f["watches"]),
                    f"{f['cpu_s']:.2f}",
                    f"{f['cpu_ms_per_resource']:.1f}",
                )
            )
        for name, f in r["others"].items():
            rows.append((name, "", "", "", "", "", "", f"{f['cpu_s']:.2f}", f"{f['cpu_ms_per_resource']:.1f}"))
        print(rate_table(rows))
        print("requests by verb and resource (audit log):")
        for name, f in r["roles"].items():
            print(f"  {name}: " + ", ".join(f"{k} {n}" for k, n in f["requests"].items()))
        api = r["resource_api"]
        print(f"resource API after the seed: {api['login']} login(s), {api['key']} key request(s)")
    print("\ntargets:")
    for r in results:
        for t in r["targets"]:
            value = "n/a" if t["value"] is None else t["value"]
            print(f"  N={r['resources']}: {t['target']}: {value} -> {'met' if t['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default=os.environ.get("IU_BENCH_MANY_COUNTS", "100"), help="e.g. 100,1000")
    parser.add_argument("--agents", type=int, default=2, help="agent processes (simulated nodes), default 2")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per count to all Ready (default max(60, N))")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.counts.split(",") if n.strip()]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the fleet (finally)
    results = []
    try:
        with Fleet(agents=args.agents) as fleet:
            say("seed: one ImageUnlock unlocks the archive on every node")
            seed_s = fleet.seed()
            fleet.quiet(fleet.audit_end(), still=2.0, timeout=20.0)
            for count in counts:
                say(f"{count}: creating {count} ImageUnlocks naming the same archive")
                results.append(measure(fleet, count, args.timeout or max(60.0, float(count))))
    except Unavailable as exc:
        print(f"bench: unavailable: {exc}", file=sys.stderr)
        return UNAVAILABLE
    report(results, seed_s)
    if args.json:
        Path(args.json).write_text(json.dumps({"seed_s": round(seed_s, 3), "results": results}, indent=2))
    return 0 if all(r["all_ready"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
