"""The agent's Secret watches (agent/secrets.py): one per named Secret, a change reported
once, the first report (the state when the watch began) not at all; no data kept."""

from __future__ import annotations

import threading

from imageunlock.agent.secrets import SecretWatches


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
