"""Benchmark: what a steady fleet costs while nothing changes (issue 22, item 1), against the
real API server and the real agent and controller processes.

    make bench-idle                                                   # a 120 s window
    .venv/bin/python benchmarks/bench_idle.py --seconds 10 --count 2 --json report.json   # smoke

Setup (benchmarks/fleet.py): the local control plane with its audit log, one private dockerd
shared by M agents (``--agents``, 2), the controller, a loopback resource API; a seed
ImageUnlock unlocks the archive on every node, then ``--count`` (100) more naming the same
archive become Ready (the fast path). Once the roles have fallen quiet (no request but watches
for 3 s, at most 60 s), the fleet is left alone for ``--seconds`` (120) and, per role (each
agent, the controller):

* API requests per idle minute, from the audit log, by verb and resource — watches apart: a
  watch is one request while it lasts, so only those (re)started in the window are shown;
  the controller's Lease (leader election: a get and an update every 2 s) is counted apart;
* CPU % of one core over the window (/proc/<pid>/stat utime + stime delta), and the API
  server's, etcd's and dockerd's for context;
* RSS (VmRSS) at the end.

Targets (issue 22): 0 API requests per idle minute beyond watches; idle CPU <= 0.1 % of a core;
RSS <= 80 MiB for an agent and for the controller. Figures are printed and compared, never
asserted: the exit status is non-zero only when something failed (the fleet never became
Ready: 1, a part did not come up: 3). Note the window: every agent re-verifies its images every
IMAGEUNLOCK_VERIFY_INTERVAL (300 s by default, against the runtime, no API write), which a
window shorter than that does not include.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.fleet import NAMESPACE, UNAVAILABLE, Fleet, ReadyWatch, Unavailable, rate_table, say  # noqa: E402

TARGET_REQUESTS_PER_MIN = 0.0  # beyond watches and the controller's Lease (a get and an update per 2 s)
TARGET_CPU_PCT = 0.1  # of one core
TARGET_RSS_MIB = {"agent": 80.0, "controller": 80.0}


def measure(fleet: Fleet, seconds: float) -> dict[str, Any]:
    since, cpu_before, started = fleet.audit_end(), fleet.cpu(), time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:  # bounded: the window's length
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    window = time.monotonic() - started
    cpu_after = fleet.cpu()
    rss = {role.name: round(role.rss_mib(), 1) for role in fleet.roles}
    time.sleep(0.5)  # a request the window's last instant saw is in the log by now
    made = fleet.requests(since)
    minutes = window / 60
    roles = {}
    for role in fleet.roles:
        counts = made[role.name]
        calls = {f"{verb} {resource}": n for (verb, resource), n in sorted(counts.items()) if verb != "watch"}
        watches = {f"watch {resource}": n for (verb, resource), n in sorted(counts.items()) if verb == "watch"}
        cpu_s = cpu_after[role.name] - cpu_before[role.name]
        lease = sum(n for k, n in calls.items() if k.endswith(" leases"))  # leader election: apart
        roles[role.name] = {
            "requests": calls,
            "requests_per_min": round((sum(calls.values()) - lease) / minutes, 2),
            "lease_requests_per_min": round(lease / minutes, 2),
            "by_request_per_min": {k: round(n / minutes, 2) for k, n in calls.items()},
            "watches_started": watches,
            "cpu_s": round(cpu_s, 3),
            "cpu_pct": round(100 * cpu_s / window, 3),
            "rss_mib": rss[role.name],
        }
    others = {
        name: {"cpu_s": round(cpu_after[name] - cpu_before[name], 3)}
        for name in ("apiserver", "etcd", "dockerd")
        if name in cpu_after and name in cpu_before
    }
    for figures in others.values():
        figures["cpu_pct"] = round(100 * figures["cpu_s"] / window, 3)
    result = {"window_s": round(window, 1), "roles": roles, "others": others}
    result["targets"] = targets(result)
    return result


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for name, f in r["roles"].items():
        kind = "controller" if name == "controller" else "agent"
        found += [
            {
                "target": f"{name}: API requests per idle minute beyond watches = {TARGET_REQUESTS_PER_MIN:g}",
                "value": f["requests_per_min"],
                "met": f["requests_per_min"] <= TARGET_REQUESTS_PER_MIN,
            },
            {
                "target": f"{name}: idle CPU <= {TARGET_CPU_PCT:g} % of a core",
                "value": f["cpu_pct"],
                "met": f["cpu_pct"] <= TARGET_CPU_PCT,
            },
            {
                "target": f"{name}: RSS <= {TARGET_RSS_MIB[kind]:g} MiB",
                "value": f["rss_mib"],
                "met": f["rss_mib"] <= TARGET_RSS_MIB[kind],
            },
        ]
    return found


def report(r: dict[str, Any], count: int, agents: int) -> None:
    print()
    print(
        f"idle fleet: the seed + {count} Ready ImageUnlocks on {agents} agents, left alone for "
        f"{r['window_s']:.0f} s (real API server, audit log)"
    )
    rows = [("role", "requests/min", "CPU s", "CPU % core", "RSS MiB")]
    for name, f in r["roles"].items():
        rows.append(
            (name, f"{f['requests_per_min']:.2f}", f"{f['cpu_s']:.2f}", f"{f['cpu_pct']:.3f}", f"{f['rss_mib']:.1f}")
        )
    for name, f in r["others"].items():
        rows.append((name, "", f"{f['cpu_s']:.2f}", f"{f['cpu_pct']:.3f}", ""))
    print(rate_table(rows))
    print("requests per idle minute by verb and resource (audit log; watches (re)started in the window apart):")
    for name, f in r["roles"].items():
        calls = ", ".join(f"{k} {n:.2f}" for k, n in f["by_request_per_min"].items()) or "none"
        watches = ", ".join(f"{k} {n}" for k, n in f["watches_started"].items()) or "none"
        print(f"  {name}: {calls}; watches started: {watches}")
    print("\ntargets:")
    for t in r["targets"]:
        print(f"  {t['target']}: {t['value']} -> {'met' if t['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="the idle window (default 120)")
    parser.add_argument("--count", type=int, default=100, help="ImageUnlocks besides the seed (default 100)")
    parser.add_argument("--agents", type=int, default=2, help="agent processes (simulated nodes), default 2")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the fleet (finally)
    try:
        with Fleet(agents=args.agents) as fleet:
            say("seed: one ImageUnlock unlocks the archive on every node")
            fleet.seed()
            names = [f"iu-{i:04d}" for i in range(args.count)]
            with ReadyWatch(fleet, NAMESPACE) as watch:
                say(f"{args.count} more ImageUnlocks naming the same archive")
                fleet.create_all(NAMESPACE, names)
                if not watch.wait(set(names), max(60.0, float(args.count))):
                    print(f"bench: only {len(watch.ready)} of {args.count + 1} Ready", file=sys.stderr)
                    return 1
            say("all Ready; waiting for the roles to fall quiet")
            fleet.quiet(fleet.audit_end(), timeout=60.0)
            say(f"idle window: {args.seconds:.0f} s")
            result = measure(fleet, args.seconds)
    except Unavailable as exc:
        print(f"bench: unavailable: {exc}", file=sys.stderr)
        return UNAVAILABLE
    result.update(count=args.count, agents=args.agents)
    report(result, args.count, args.agents)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
