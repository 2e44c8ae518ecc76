"""Soak: many bounded create/delete cycles; the operator's memory must not creep."""

from __future__ import annotations

import time

import pytest

from ..support.cluster import is_stalled, spec_for
from ..support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CYCLES, WARMUP, TIME_LIMIT = 200, 20, 300.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_create_delete_cycles_leave_nothing_and_do_not_grow(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    # Each cycle's object is new, so nothing vouches for the images: with the archive absent it
    # stalls (ArchiveNotFound) at once, no key asked for. Every cycle still exercises what could
    # leak: status writes, an event, the resync schedule, metrics series, the claims cache.
    clean_docker.docker("load", "-i", str(archives.plaintext))
    operator = start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600", IMAGEUNLOCK_LOG_LEVEL="info")
    spec = spec_for(str(archive_root / "images.enc"), archives.version, secret)
    deadline = time.monotonic() + TIME_LIMIT
    baseline = 0
    for cycle in range(CYCLES):
        assert time.monotonic() < deadline, f"soak exceeded {TIME_LIMIT}s at cycle {cycle}"
        name = f"soak-{cycle}"
        cluster.create_unlock(namespace, name, spec)
        wait_for(lambda name=name: is_stalled(cluster, namespace, name), 30, f"{name} Stalled", interval=0.02)
        cluster.delete(namespace, name)
        if cycle == WARMUP:
            baseline = rss_kib(operator.proc.pid)
    final = rss_kib(operator.proc.pid)
    assert cluster.list(namespace) == []
    assert resource_api.calls["/binary-split/key-fragment"] == 0
    growth = (final - baseline) / baseline
    print(f"\nsoak: {CYCLES} cycles, operator RSS {baseline} KiB after warm-up -> {final} KiB ({growth:+.1%})")
    assert growth < 0.10
    assert "Traceback" not in operator.log()
