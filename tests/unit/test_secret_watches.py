"""The agent's Secret watches (agent/secrets.py): one per named Secret, a change reported
once, the first report (the state when the watch began) not at all; no data kept."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

from urllib3.exceptions import ProtocolError

from imageunlock.agent.secrets import SecretWatches
from imageunlock.kube.client import SECRET_WATCH_SECONDS, KubernetesApi, StopEvent


class FakeFollow:
    """Stands in for KubernetesApi.follow_secret: records each watch, runs no thread of its own."""

    def __init__(self) -> None:
        self.reports: dict[tuple[str, str], object] = {}
        self.stops: dict[tuple[str, str], threading.Event] = {}

    def __call__(self, namespace, name, on_change, stop) -> None:
        self.reports[(namespace, name)] = on_change
        self.stops[(namespace, name)] = stop


def test_a_change_after_the_first_report_calls_back_once_per_change():
    follow, changed = FakeFollow(), []
    watches = SecretWatches(follow, changed.append)
    watches.sync({("ns", "creds")})
    for thread in threading.enumerate():
        if thread.name.startswith("secret-watch"):
            thread.join(1)
    report = follow.reports[("ns", "creds")]
    report(None)  # the Secret does not exist when the watch begins: nothing to re-check
    assert changed == []
    report("7")  # created
    report("7")  # the same version again (a relist): no news
    report("8")  # changed
    report(None)  # deleted
    assert changed == [("ns", "creds")] * 3


def test_sync_starts_and_ends_watches_and_a_stopped_one_reports_nothing():
    follow, changed = FakeFollow(), []
    watches = SecretWatches(follow, changed.append)
    watches.sync({("a", "one"), ("b", "two")})
    assert watches.followed() == {("a", "one"), ("b", "two")}
    for thread in threading.enumerate():
        if thread.name.startswith("secret-watch"):
            thread.join(1)
    report = follow.reports[("a", "one")]
    report("1")
    watches.sync({("b", "two")})
    assert follow.stops[("a", "one")].is_set() and not follow.stops[("b", "two")].is_set()
    report("2")  # a late report of the ended watch
    assert changed == []
    watches.stop()
    assert follow.stops[("b", "two")].is_set() and watches.followed() == set()


def test_a_watch_that_begins_on_an_existing_secret_says_so_without_a_change():
    """The watch starts only once an object failed on its Secret: one created in between is
    reported by ``began`` (its objects are looked at), not as a change (nothing is revoked)."""
    follow, changed, began = FakeFollow(), [], []
    watches = SecretWatches(follow, changed.append, began=began.append)
    watches.sync({("ns", "creds"), ("ns", "absent")})
    _join_watch_threads()
    follow.reports[("ns", "creds")]("7")
    follow.reports[("ns", "absent")](None)
    assert began == [("ns", "creds")] and changed == []


def _join_watch_threads() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("secret-watch"):
            thread.join(1)


def test_watches_per_agent_are_capped_and_the_overflow_said_once(caplog):
    """A tenant with 300 objects each naming another (even missing) Secret cost 300 threads
    and 300 API server watches on every agent. At most ``limit`` now; the rest wait for the
    verify interval, said once at WARNING."""
    release = threading.Event()

    def follow(namespace, name, on_change, stop):
        release.wait(10)

    watches = SecretWatches(follow, lambda key: None, limit=50)
    before = threading.active_count()
    try:
        with caplog.at_level(logging.WARNING, logger="imageunlock.agent.secrets"):
            watches.sync({("team-b", f"s{i}") for i in range(300)})
            watches.sync({("team-b", f"s{i}") for i in range(301)})
        started = threading.active_count() - before
        assert started <= 50 and len(watches.followed()) == 50
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        release.set()
        watches.stop()


def test_a_stopped_watch_ends_at_once_not_when_the_server_ends_it():
    """The stop flag was checked only when an event arrived: a quiet Secret's watch thread
    lingered up to the whole watch (300 s). Its open response is now cut when it is stopped."""
    api = KubernetesApi.__new__(KubernetesApi)
    api.core = QuietSecrets()
    stop = StopEvent()
    thread = threading.Thread(target=api.follow_secret, args=("ns", "creds", lambda version: None, stop), daemon=True)
    thread.start()
    assert api.core.watching.wait(5)
    stop.set()
    thread.join(3)
    alive = thread.is_alive()
    api.core.release.set()
    assert not alive, "the watch thread outlived its stop"
    assert api.core.timeouts == [SECRET_WATCH_SECONDS] and SECRET_WATCH_SECONDS <= 60


class QuietResponse:
    """A watch response on which nothing happens until it is shut down (or the test ends)."""

    status = 200

    def __init__(self, release: threading.Event) -> None:
        self.release, self.cut = release, threading.Event()

    def stream(self, amt=None, decode_content=False):
        while not self.cut.is_set() and not self.release.is_set():
            self.cut.wait(0.05)
        if self.cut.is_set():
            raise ProtocolError("connection shut down")
        return iter(())

    def shutdown(self) -> None:
        self.cut.set()

    def close(self) -> None:
        return

    def release_conn(self) -> None:
        return


class QuietSecrets:
    """CoreV1Api as far as follow_secret goes: an empty list, then a watch with no events."""

    def __init__(self) -> None:
        self.watching, self.release = threading.Event(), threading.Event()
        self.timeouts: list[int] = []

    def list_namespaced_secret(self, namespace, **kwargs):
        """:param bool watch: Watch for changes."""
        if not kwargs.get("watch"):
            return SimpleNamespace(data=b'{"items": [], "metadata": {"resourceVersion": "5"}}')
        self.timeouts.append(kwargs.get("timeout_seconds"))
        self.watching.set()
        return QuietResponse(self.release)
