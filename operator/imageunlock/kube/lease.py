"""Leader election with a ``coordination.k8s.io/v1`` Lease, as client-go's ``leaderelection``.

Every candidate reads the Lease each retry period. The holder renews it (``renewTime``);
another candidate takes it over only once it has seen the same record unchanged for
``leaseDurationSeconds`` by its *own* clock (no trust in other machines' clocks), and every
write carries the ``resourceVersion`` it read, so two candidates never both win (the loser
gets 409 Conflict). The leader counts itself leader only until ``renew_deadline`` after the
start of its last successful renewal, which is shorter than the lease: it stops before anyone
may take over, even when its renewals hang. On evidence of another holder (a conflict, or
another name in the Lease) it stops at once.

Blocking: :meth:`LeaseElector.run` runs on a thread of its own, never on kopf's event loop.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import kubernetes

from imageunlock.errors import UnlockError
from imageunlock.kube.client import Refused, _call

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseRecord:
    """A Lease's spec and resourceVersion ("" before it exists)."""

    holder: str
    duration: int  # leaseDurationSeconds
    acquired: datetime | None
    renewed: datetime | None
    transitions: int
    version: str = ""


class LeaseConflict(Exception):
    """Another candidate wrote the Lease first (HTTP 409)."""


class Leases(Protocol):
    """One Lease: read it (None when absent), create it, update it at the version it was read."""

    def get(self) -> LeaseRecord | None: ...
    def create(self, record: LeaseRecord) -> LeaseRecord: ...
    def update(self, record: LeaseRecord) -> LeaseRecord: ...


@dataclass(frozen=True)
class Timing:
    """Seconds. Takeover after the leader dies: at most retry + lease (the last renewal is seen
    up to a retry period late, then must stay unchanged for the lease duration)."""

    lease: float = 10.0
    renew_deadline: float = 7.0
    retry: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry < self.renew_deadline < self.lease:
            raise ValueError("leader election needs 0 < retry period < renew deadline < lease duration")


def identity() -> str:
    """The pod's name (downward API POD_NAME), else host name and a random suffix."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"


class LeaseElector:
    def __init__(
        self,
        leases: Leases,
        identity: str,
        timing: Timing = Timing(),
        on_change: Callable[[bool], None] = lambda leading: None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.leases, self.identity, self.timing = leases, identity, timing
        self.on_change = on_change  # called on the elector's thread when leadership starts or ends
        self.clock, self.wall = clock, wall
        self._lock = threading.Lock()
        self._valid_until = -math.inf  # leader until then (clock)
        self._observed: LeaseRecord | None = None
        self._observed_at = -math.inf  # when the observed record was first seen (clock)
        self._leading = False  # as last reported to on_change

    def is_leader(self) -> bool:
        """True while this candidate may act as the leader (checked before every write)."""
        with self._lock:
            return self.clock() < self._valid_until

    def try_acquire_or_renew(self) -> bool:
        """One attempt: take the Lease if it is free, ours or expired, renew it if ours."""
        started, now = self.clock(), self.wall()
        current = self.leases.get()
        if current is None:
            return self._write(
                self.leases.create, LeaseRecord(self.identity, math.ceil(self.timing.lease), now, now, 0), started
            )
        if current != self._observed:
            self._observed, self._observed_at = current, started
        if current.holder and current.holder != self.identity:
            self._step_down()
            if started < self._observed_at + current.duration:
                return False  # another's, and still valid
        ours = current.holder == self.identity
        record = replace(
            current,
            holder=self.identity,
            duration=math.ceil(self.timing.lease),
            acquired=current.acquired if ours else now,
            renewed=now,
            transitions=current.transitions + (0 if ours else 1),
        )
        return self._write(self.leases.update, record, started)

    def _write(self, write: Callable[[LeaseRecord], LeaseRecord], record: LeaseRecord, started: float) -> bool:
        try:
            written = write(record)
        except LeaseConflict:
            self._step_down()  # someone else wrote it: theirs, until seen otherwise
            return False
        with self._lock:
            self._valid_until = started + self.timing.renew_deadline
        self._observed, self._observed_at = written, started
        return True

    def _step_down(self) -> None:
        with self._lock:
            self._valid_until = -math.inf

    def run(self, stop: threading.Event) -> None:
        """Campaign and renew until ``stop`` is set; then release the Lease if held."""
        while not stop.is_set():
            try:
                self.try_acquire_or_renew()
            except UnlockError as exc:  # the API server is away: leadership lapses on the clock
                log.warning("leader election: %s", exc.message)
            except Exception:  # a bug: logged; the next attempt may fare better
                log.exception("leader election attempt failed")
            self._report()
            stop.wait(self._next_wait())
        self.release()

    def _report(self) -> None:
        leading = self.is_leader()
        if leading != self._leading:
            self._leading = leading
            log.info("%s leadership of the controller (%s)", "acquired" if leading else "lost", self.identity)
            self.on_change(leading)

    def _next_wait(self) -> float:
        """A retry period; a standby waits only until the Lease it sees expires."""
        wait = self.timing.retry
        record = self._observed
        if record is not None and not self.is_leader() and record.holder and record.holder != self.identity:
            wait = min(wait, self._observed_at + record.duration - self.clock())
        return max(wait, self.timing.retry / 20)

    def release(self) -> None:
        """Stop leading, then hand the Lease back (empty holder) so a standby need not wait for
        it to expire; a failure is logged (the Lease then expires)."""
        if not self.is_leader() or self._observed is None:
            return
        self._step_down()
        now = self.wall()
        try:
            self.leases.update(replace(self._observed, holder="", duration=1, acquired=now, renewed=now))
            log.info("released the controller's leadership (%s)", self.identity)
        except (LeaseConflict, UnlockError) as exc:
            log.warning("could not release the Lease (%s); it expires on its own", type(exc).__name__)
        self._report()


class KubeLeases:
    """:class:`Leases` on the API server: the Lease ``namespace/name``."""

    def __init__(
        self, api_client: kubernetes.client.ApiClient, namespace: str, name: str, timeout: float = 3.0
    ) -> None:
        self.api = kubernetes.client.CoordinationV1Api(api_client)
        self.namespace, self.name = namespace, name
        # Every call bounded: a half-open connection must not hang the elector for ever (it
        # would stop leading on its own clock, but never campaign again).
        self.timeout = timeout
        self.what = f"Lease {namespace}/{name}"

    def get(self) -> LeaseRecord | None:
        lease = _call(
            f"reading {self.what}",
            lambda: self.api.read_namespaced_lease(self.name, self.namespace, _request_timeout=self.timeout),
            (404,),
        )
        return None if isinstance(lease, Refused) else _record(lease)

    def create(self, record: LeaseRecord) -> LeaseRecord:
        body = self._body(record)
        lease = _call(
            f"creating {self.what}",
            lambda: self.api.create_namespaced_lease(self.namespace, body, _request_timeout=self.timeout),
            (409,),
        )
        if isinstance(lease, Refused):
            raise LeaseConflict
        return _record(lease)

    def update(self, record: LeaseRecord) -> LeaseRecord:
        body = self._body(record)
        lease = _call(
            f"updating {self.what}",
            lambda: self.api.replace_namespaced_lease(self.name, self.namespace, body, _request_timeout=self.timeout),
            (409,),
        )
        if isinstance(lease, Refused):
            raise LeaseConflict
        return _record(lease)

    def _body(self, record: LeaseRecord) -> kubernetes.client.V1Lease:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if record.version:
            meta["resourceVersion"] = record.version  # the update fails (409) if it moved on
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": record.holder,
                "leaseDurationSeconds": record.duration,
                "acquireTime": _micro(record.acquired),
                "renewTime": _micro(record.renewed),
                "leaseTransitions": record.transitions,
            },
        }
        lease = kubernetes.client.V1Lease.from_dict(body)
        assert lease is not None  # from_dict(None) alone is None
        return lease


def _micro(t: datetime | None) -> str | None:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") if t else None


def _record(lease: Any) -> LeaseRecord:
    spec = lease.spec
    return LeaseRecord(
        holder=spec.holder_identity or "",
        duration=int(spec.lease_duration_seconds or 0),
        acquired=spec.acquire_time,
        renewed=spec.renew_time,
        transitions=int(spec.lease_transitions or 0),
        version=lease.metadata.resource_version or "",
    )
