"""The benchmark's figures: one JSON-able summary, and the table printed from it.

Per step (the floor's parts and every pipeline), over the rounds: own CPU (median, min, max;
user and sys), wall (median, min, max, spread), peak RSS and own disk writes (max over
rounds), the Engine's CPU and writes (medians, shown apart: never part of "own"). Per runtime,
the floor: ``openssl enc -d`` of the archive body + ``openssl dgst -sha256`` of the plaintext
+ that runtime's own CLI sending the plaintext (its "send" pipeline), summed round by round;
and each other pipeline's own CPU over that floor, round by round. Per runtime, the naive
pipeline (``openssl enc -d`` piped into the runtime's CLI: what a user would write instead):
each unlock's wall over the naive pipeline's wall, and its own CPU over the naive one's, round
by round (both ran in the same round, a few seconds apart).

Disk, system-wide, per step (``disk``): the command's own writes and the runtime daemon's
(max over rounds, and their sum per round), what reached the block devices (median, min,
max; none when every path is on tmpfs), the peak bytes polled in the runtime's temp dir and
in the pipeline's scratch dir, the image store's bytes after the run, and the mode and owner
of the temp dir and what the runtime made in it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .measure import CpuInfo, Spread, Usage
from .workload import human

TARGET_CPU_RATIO = 1.10  # own CPU of an unlock over the floor, same archive, same run
TARGET_RSS_MIB = 150.0
TARGET_WRITE_PCT = 1.0  # own disk writes, percent of the archive
TARGET_WALL_RATIO = 1.0  # wall of an unlock over the naive pipeline's, same round

SEND, UNLOCK, BASELINE, NAIVE, FLOOR = "send", "unlock", "baseline", "naive", "floor"


@dataclass(frozen=True)
class Step:
    """One measured command of a round. ``role``: FLOOR (a part of every runtime's floor),
    SEND (the runtime's own CLI loading the plaintext: the floor's last part), UNLOCK (an
    imageunlock pipeline: held to the targets), BASELINE (for comparison) or NAIVE (the
    streaming pipeline a user would write instead: the unlock's wall-time anchor)."""

    key: str
    title: str
    role: str
    runtime: str | None = None  # the Engine it loads into: emptied before, checked after


@dataclass(frozen=True)
class Run:
    step: Step
    round: int
    usage: Usage
    engine_cpu: float | None
    engine_write_bytes: int | None
    ok: bool
    log: Path
    devices: tuple[str, ...] = ()  # block devices of the work dir, data root and temp dir
    device_write_bytes: int | None = None  # /proc/diskstats delta; None: all on tmpfs
    temp_peak_bytes: int | None = None  # polled peak in the runtime's temp dir
    temp_dirs: tuple[str, ...] = ()  # "path mode uid gid" of the temp dir and what was made in it
    scratch_peak_bytes: int = 0  # polled peak in the pipeline's own scratch dir
    store_bytes: int | None = None  # the runtime's data root, without its temp dir, after the run


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present and len(present) == len(values) else None


def summarize(
    *,
    steps: list[Step],
    runs: list[Run],
    rounds: int,
    archive_bytes: int,
    images: int,
    payload_per_image: int,
    cpu: CpuInfo,
    engines: dict[str, dict[str, str]],
    load_before: float,
    load_after: float,
    rss_floor_mib: float,
) -> dict[str, Any]:
    ok = [run for run in runs if run.ok]
    per_step: dict[str, Any] = {}
    for step in steps:
        mine = [run for run in ok if run.step.key == step.key]
        if not mine:
            per_step[step.key] = {"title": step.title, "role": step.role, "runtime": step.runtime, "runs": 0}
            continue
        engine_cpu = _median([run.engine_cpu for run in mine])
        engine_writes = _median([run.engine_write_bytes for run in mine])
        per_step[step.key] = {
            "title": step.title,
            "role": step.role,
            "runtime": step.runtime,
            "runs": len(mine),
            "cpu_s": Spread.of([run.usage.cpu for run in mine]).as_dict(),
            "user_s": round(statistics.median(run.usage.user for run in mine), 3),
            "sys_s": round(statistics.median(run.usage.sys for run in mine), 3),
            "wall_s": Spread.of([run.usage.wall for run in mine]).as_dict(),
            "peak_rss_mib": round(max(run.usage.rss_mib for run in mine), 1),
            "disk_write_bytes": max(run.usage.write_bytes for run in mine),
            "disk_write_pct": round(100.0 * max(run.usage.write_bytes for run in mine) / archive_bytes, 4),
            "engine_cpu_s": None if engine_cpu is None else round(engine_cpu, 3),
            "engine_write_bytes": None if engine_writes is None else int(engine_writes),
            "disk": _disk(mine, archive_bytes),
        }

    # The floor, per runtime and per round: every part measured in that round.
    cpu_of = {(run.step.key, run.round): run.usage.cpu for run in ok}
    floor_parts = [step.key for step in steps if step.role == FLOOR]
    floors: dict[str, Any] = {}
    for runtime in sorted({step.runtime for step in steps if step.runtime}):
        send = next((step.key for step in steps if step.role == SEND and step.runtime == runtime), None)
        if send is None:
            continue
        parts = [*floor_parts, send]
        by_round = {
            rnd: sum(cpu_of[(key, rnd)] for key in parts)
            for rnd in range(1, rounds + 1)
            if all((key, rnd) in cpu_of for key in parts)
        }
        if not by_round:
            continue
        floors[runtime] = {"parts": parts, "cpu_s": Spread.of(list(by_round.values())).as_dict()}
        for step in steps:
            if step.runtime != runtime or step.role not in (UNLOCK, BASELINE, NAIVE):
                continue
            ratios = [cpu_of[(step.key, rnd)] / floor for rnd, floor in by_round.items() if (step.key, rnd) in cpu_of]
            if ratios:
                per_step[step.key]["cpu_over_floor"] = Spread.of(ratios).as_dict()
            if step.role == UNLOCK and per_step[send].get("wall_s") and per_step[step.key].get("wall_s"):
                per_step[step.key]["wall_over_send"] = round(
                    per_step[step.key]["wall_s"]["median"] / per_step[send]["wall_s"]["median"], 3
                )

    # The naive pipeline, per runtime: each unlock's wall and own CPU over it, round by round.
    wall_of = {(run.step.key, run.round): run.usage.wall for run in ok}
    for runtime in sorted({step.runtime for step in steps if step.runtime}):
        naive = next((step.key for step in steps if step.role == NAIVE and step.runtime == runtime), None)
        if naive is None:
            continue
        for step in steps:
            if step.runtime != runtime or step.role != UNLOCK:
                continue
            same = [rnd for rnd in range(1, rounds + 1) if (step.key, rnd) in wall_of and (naive, rnd) in wall_of]
            if not same:
                continue
            per_step[step.key]["naive"] = naive
            per_step[step.key]["wall_over_naive"] = Spread.of(
                [wall_of[(step.key, rnd)] / wall_of[(naive, rnd)] for rnd in same]
            ).as_dict()
            per_step[step.key]["cpu_over_naive"] = Spread.of(
                [cpu_of[(step.key, rnd)] / cpu_of[(naive, rnd)] for rnd in same]
            ).as_dict()

    targets = []
    for step in steps:
        figures = per_step[step.key]
        if step.role != UNLOCK or not figures["runs"]:
            continue
        ratio = figures.get("cpu_over_floor", {}).get("median")
        targets += [
            _target(f"({step.key}) own CPU / floor <= {TARGET_CPU_RATIO:.2f}", ratio, TARGET_CPU_RATIO),
            _target(f"({step.key}) peak RSS <= {TARGET_RSS_MIB:.0f} MiB", figures["peak_rss_mib"], TARGET_RSS_MIB),
            _target(
                f"({step.key}) own disk writes <= {TARGET_WRITE_PCT:.0f} % of the archive",
                figures["disk_write_pct"],
                TARGET_WRITE_PCT,
            ),
        ]
        if "wall_over_naive" in figures:
            targets.append(
                _target(
                    f"({step.key}) wall / ({figures['naive']}) naive wall <= {TARGET_WALL_RATIO:.2f}",
                    figures["wall_over_naive"]["median"],
                    TARGET_WALL_RATIO,
                )
            )
    return {
        "archive": {"bytes": archive_bytes, "images": images, "payload_per_image_bytes": payload_per_image},
        "rounds": rounds,
        "host": {
            "cpu_model": cpu.model,
            "cpus": cpu.cpus,
            "aes": cpu.aes,
            "sha": cpu.sha,
            "cpu_flags": list(cpu.flags),
            "load_average_before": round(load_before, 2),
            "load_average_after": round(load_after, 2),
        },
        "engines": engines,
        "rss_floor_mib": round(rss_floor_mib, 1),
        "steps": per_step,
        "floor": floors,
        "targets": targets,
    }


def _max(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _spread_bytes(values: list[int]) -> dict[str, int] | None:
    return {"median": int(statistics.median(values)), "min": min(values), "max": max(values)} if values else None


def _disk(runs: list[Run], archive_bytes: int) -> dict[str, Any]:
    """Where the bytes went, system-wide, over the rounds of one step."""
    engine = [run.engine_write_bytes for run in runs]
    system = [None if e is None else run.usage.write_bytes + e for run, e in zip(runs, engine, strict=True)]
    device = [run.device_write_bytes for run in runs if run.device_write_bytes is not None]
    temp_dirs: dict[str, None] = {}
    for run in runs:
        temp_dirs.update(dict.fromkeys(run.temp_dirs))
    most = _max(system)
    return {
        "own_write_bytes": max(run.usage.write_bytes for run in runs),
        "engine_write_bytes": _max(engine),
        "system_write_bytes": most,  # own + the runtime daemon's, per round, max over rounds
        "system_write_pct": None if most is None else round(100.0 * most / archive_bytes, 2),
        "devices": sorted({d for run in runs for d in run.devices}),
        "device_write_bytes": _spread_bytes(device),
        "temp_peak_bytes": _max([run.temp_peak_bytes for run in runs]),
        "temp_dirs": list(temp_dirs),
        "scratch_peak_bytes": max(run.scratch_peak_bytes for run in runs),
        "store_bytes": _max([run.store_bytes for run in runs]),
    }


def _target(name: str, value: float | None, limit: float) -> dict[str, Any]:
    return {"target": name, "value": value, "limit": limit, "met": value is not None and value <= limit}


def render(summary: dict[str, Any], steps: list[Step], cpu: CpuInfo) -> str:
    archive = summary["archive"]
    lines = [
        "",
        f"ImageUnlock benchmark: {archive['images']} images x {human(archive['payload_per_image_bytes'])} payload, "
        f"archive {human(archive['bytes'])} ({archive['bytes']:,} bytes), {summary['rounds']} interleaved round(s)",
        f"host: {cpu.describe()}; load average {summary['host']['load_average_before']:.2f} before, "
        f"{summary['host']['load_average_after']:.2f} after",
    ]
    for runtime, engine in summary["engines"].items():
        lines.append(f"{runtime}: " + ", ".join(f"{k} {v}" for k, v in engine.items()))
    lines += [
        "Own CPU (user+sys of the process and its children, rusage; never the Engine's) is steady from",
        "round to round; wall time is not (a shared machine, and it waits on the Engine).",
        "",
        f"{'step':<48} {'own CPU s: median':>17} {'min':>6} {'max':>6} {'user':>6} {'sys':>6} "
        f"{'CPU/floor':>9} | {'wall s: median':>14} {'min':>6} {'max':>6} {'spread':>7} | "
        f"{'peak RSS':>9} {'own disk writes':>15} | {'Engine CPU s':>12} {'Engine writes':>13}",
    ]
    for step in steps:
        figures = summary["steps"][step.key]
        label = f"floor: {step.title}" if step.role == FLOOR else f"({step.key}) {step.title}"
        if not figures["runs"]:
            lines.append(f"{label:<48} (no successful run)")
            continue
        cpu_s, wall = figures["cpu_s"], figures["wall_s"]
        ratio = figures.get("cpu_over_floor")
        engine_cpu, engine_writes = figures["engine_cpu_s"], figures["engine_write_bytes"]
        lines.append(
            f"{label:<48} {cpu_s['median']:>17.2f} {cpu_s['min']:>6.2f} {cpu_s['max']:>6.2f} "
            f"{figures['user_s']:>6.2f} {figures['sys_s']:>6.2f} "
            f"{(format(ratio['median'], '.3f') if ratio else '-'):>9} | "
            f"{wall['median']:>14.2f} {wall['min']:>6.2f} {wall['max']:>6.2f} {wall['spread_pct']:>6.0f}% | "
            f"{figures['peak_rss_mib']:>5.1f} MiB {human(figures['disk_write_bytes']):>15} | "
            f"{('-' if engine_cpu is None else format(engine_cpu, '.2f')):>12} "
            f"{('-' if engine_writes is None else human(engine_writes)):>13}"
        )
    lines.append("")
    for runtime, floor in summary["floor"].items():
        titles = " + ".join(
            summary["steps"][key]["title"] if summary["steps"][key]["role"] == FLOOR else f"({key})"
            for key in floor["parts"]
        )
        f = floor["cpu_s"]
        lines.append(
            f"floor ({runtime}) = {titles}: {f['median']:.2f} s CPU (per-round sums {f['min']:.2f}-{f['max']:.2f})"
        )
        for step in steps:
            figures = summary["steps"][step.key]
            ratio = figures.get("cpu_over_floor")
            if step.runtime != runtime or not ratio:
                continue
            line = f"  ({step.key}) own CPU / floor: {ratio['median']:.3f}"
            line += f" (per round {ratio['min']:.3f}-{ratio['max']:.3f})"
            if "wall_over_send" in figures:
                line += f"; wall / ({floor['parts'][-1]}) wall: {figures['wall_over_send']:.3f} (noisy)"
            lines.append(line)
        for step in steps:
            figures = summary["steps"][step.key]
            if step.runtime != runtime or "wall_over_naive" not in figures:
                continue
            w, c, naive = figures["wall_over_naive"], figures["cpu_over_naive"], figures["naive"]
            lines.append(
                f"  ({step.key}) wall / ({naive}) naive wall, same rounds: {w['median']:.3f} "
                f"(per round {w['min']:.3f}-{w['max']:.3f}); own CPU / naive's: {c['median']:.3f} "
                f"(per round {c['min']:.3f}-{c['max']:.3f})"
            )
    lines += [
        "",
        "Disk, system-wide (max over rounds; device writes: median (min-max) of what reached the block",
        "device, every process on the host included, '-' when all is on tmpfs):",
        f"{'step':<48} {'own writes':>11} {'runtime writes':>14} {'own+runtime':>12} {'% archive':>9} | "
        f"{'device writes (median, min-max)':>36} | {'temp dir peak':>13} {'scratch peak':>12} {'store after':>11}",
    ]
    for step in steps:
        figures = summary["steps"][step.key]
        if not figures["runs"]:
            continue
        disk = figures["disk"]
        label = f"floor: {step.title}" if step.role == FLOOR else f"({step.key}) {step.title}"

        def size(n: int | None) -> str:
            return "-" if n is None else human(n)

        device = disk["device_write_bytes"]
        device_text = "-" if device is None else (
            f"{human(device['median'])} ({human(device['min'])}-{human(device['max'])})"
        )  # fmt: skip
        pct = "-" if disk["system_write_pct"] is None else f"{disk['system_write_pct']:.2f} %"
        lines.append(
            f"{label:<48} {human(disk['own_write_bytes']):>11} {size(disk['engine_write_bytes']):>14} "
            f"{size(disk['system_write_bytes']):>12} {pct:>9} | {device_text:>36} | "
            f"{size(disk['temp_peak_bytes']):>13} {human(disk['scratch_peak_bytes']):>12} "
            f"{size(disk['store_bytes']):>11}"
        )
    shown: set[str] = set()
    for step in steps:
        for entry in summary["steps"][step.key].get("disk", {}).get("temp_dirs", []):
            if entry not in shown and step.runtime:
                shown.add(entry)
                lines.append(f"  {step.runtime} temp dir (mode, owner): {entry}")
    lines += ["", "targets:"]
    for target in summary["targets"]:
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(f"  {target['target']:<48} {value:>8}   {'met' if target['met'] else 'NOT MET'}")
    lines += [
        "",
        "notes: every command is forked by a small launcher and reaped with os.wait4: wall = fork to reap",
        "(start-up included); own CPU = ru_utime + ru_stime; peak RSS = ru_maxrss (max over rounds; the",
        f"launcher alone shows {summary['rss_floor_mib']:.1f} MiB); own disk writes = ru_oublock x 512 (bytes it",
        "dirtied for storage, deleted files included; max over rounds). Engine CPU / writes = deltas of the Engine's",
        "/proc/<pid>/stat and /proc/<pid>/io over the run (medians). Every load starts with no images in the",
        "Engine and after os.sync(); inputs are read from the page cache. Runtime writes = the daemon's",
        "/proc/<pid>/io write_bytes delta (it and its reaped children; pages dirtied on a file system with a",
        "block device, deleted files included; nothing on tmpfs). Device writes = /proc/diskstats sectors",
        "written to the devices of the work dir, data root and temp dir, os.sync() before and after. Temp dir",
        "peak = the most bytes seen, polling every 50 ms, in Docker's temp dir (the docker-import-* copy of",
        "the whole load body) or containerd's content ingest dir; scratch peak = the pipeline's own files",
        "(the seeds' decrypted tar); store after = the data root without its temp dir (the images: Docker's",
        "layers in its storage driver, containerd's content blobs and snapshots).",
    ]
    return "\n".join(lines)
