"""spec.keyCacheSeconds (issue 20, item 3): the key kept in memory, bound to the archive's
identity and the Secret's resourceVersion, for its window after the last successful use; a
repair while the resource API is down then needs no request. Injected clock, no sleeps."""

from __future__ import annotations

import logging
import subprocess
import sys

from imageunlock.agent.reconciler import Verdict
from imageunlock.engine.keys.cache import CachingKeySource, KeyCache
from imageunlock.engine.models import Phase
from imageunlock.errors import ApiUnavailableError, RuntimeUnavailableError

from ..support.fakes import FakeKeyClient
from . import test_reconciler
from .test_reconciler import FRAGMENT, NAME, NS

KEY = b"Z" * 32
world = test_reconciler.world  # the reconciler tests' fixture: an archive, fakes, a Reconciler


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_lives_for_its_window_after_the_last_successful_use():
    clock = Clock()
    cache = KeyCache(clock)
    cache.used("b", KEY, ttl=60)
    clock.now += 59
    assert cache.get("b") == KEY
    cache.used("b", KEY, ttl=60)  # used again: the window starts over
    clock.now += 59
    assert cache.get("b") == KEY
    clock.now += 1
    assert cache.get("b") is None and len(cache) == 0


def test_a_key_is_bound_to_what_it_was_used_for():
    cache = KeyCache(Clock())
    archive, other_archive = ("dev", 1, 100, 5), ("dev", 2, 100, 6)  # a new file: new inode, mtime
    cache.used(("ns", "creds", "7", archive), KEY, ttl=60)
    assert cache.get(("ns", "creds", "7", archive)) == KEY
    assert cache.get(("ns", "creds", "8", archive)) is None  # the Secret changed
    assert cache.get(("ns", "creds", "7", other_archive)) is None  # another archive file
    assert cache.get(("other", "creds", "7", archive)) is None  # another namespace's Secret


def test_an_expired_key_is_purged_unasked_and_its_bytes_overwritten():
    clock = Clock()
    cache = KeyCache(clock)
    cache.used("b", KEY, ttl=10)
    kept = next(iter(cache._entries.values())).key
    clock.now += 10
    cache.purge()
    assert len(cache) == 0 and kept == bytearray(32)
    assert "ZZZZ" not in repr(cache)


class CountingSource:
    def __init__(self) -> None:
        self.opened = 0

    def open(self):
        self.opened += 1
        return self

    def authenticate(self, say):
        return

    def get_key(self, say):
        return KEY

    def close(self):
        return


def test_the_caching_source_keeps_a_key_only_after_its_unlock_succeeded():
    cache, inner = KeyCache(Clock()), CountingSource()
    said = []

    def say(phase: Phase, message: str) -> None:
        said.append(phase)

    first = CachingKeySource(inner, cache, lambda: "b", ttl=60)
    first.open().get_key(say)
    first.failed()  # the unlock failed: nothing kept
    assert len(cache) == 0
    second = CachingKeySource(inner, cache, lambda: "b", ttl=60)
    second.open().get_key(say)
    second.succeeded()
    third = CachingKeySource(inner, cache, lambda: "b", ttl=60)
    session = third.open()
    session.authenticate(say)
    assert session.get_key(say) == KEY and inner.opened == 2 and third.hit
    unbound = CachingKeySource(inner, cache, lambda: None, ttl=60)  # e.g. the Secret is gone
    unbound.open()
    assert inner.opened == 3 and "ZZZZ" not in repr(third) + repr(session)


def test_with_key_cache_seconds_a_removed_image_is_restored_while_the_resource_api_is_down(world):
    assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
    assert world.key.fragments == 1
    world.key = FakeKeyClient(FRAGMENT, login_error=ApiUnavailableError("resource API unreachable"))
    world.runtime._images.clear()  # the images went (a manual rmi, GC)
    outcome = world.reconcile(keyCacheSeconds=3600)
    assert outcome.verdict is Verdict.READY and len(world.runtime.loads) == 2
    assert world.key.logins == 0 and world.key.fragments == 0  # no request at all
    assert "k" * 8 not in str(world.kube.status(NS, "iu"))


def test_a_kept_key_survives_a_transient_failure_and_goes_with_a_permanent_one(world):
    assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
    world.key = FakeKeyClient(FRAGMENT, login_error=ApiUnavailableError("resource API unreachable"))
    world.runtime._images.clear()
    world.runtime.load_error = RuntimeUnavailableError("dockerd restarted mid-load")
    assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.RETRY
    assert len(world.reconciler.key_cache) == 1  # still there for the retry
    world.runtime.load_error = None
    cache = world.reconciler.key_cache
    cache.used(next(iter(cache._entries)), b"Z" * 32, 3600)  # a kept key the archive does not decrypt with
    outcome = world.reconcile(keyCacheSeconds=3600)
    assert (outcome.verdict, outcome.reason) == (Verdict.STALLED, "ArchiveInvalid")
    assert len(cache) == 0  # worthless: gone


def test_without_key_cache_seconds_the_repair_waits_for_the_resource_api(world):
    assert world.reconcile().verdict is Verdict.READY
    world.key = FakeKeyClient(FRAGMENT, login_error=ApiUnavailableError("resource API unreachable"))
    world.runtime._images.clear()
    outcome = world.reconcile()
    assert (outcome.verdict, outcome.reason) == (Verdict.RETRY, "ResourceApiUnavailable")
    assert len(world.reconciler.key_cache) == 0


def test_a_changed_secret_or_archive_file_is_not_served_from_the_cache(world):
    assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
    world.kube.secret_versions[(NS, "creds")] = "2"  # the Secret changed
    world.key = FakeKeyClient(FRAGMENT, login_error=ApiUnavailableError("resource API unreachable"))
    world.runtime._images.clear()
    assert world.reconcile(keyCacheSeconds=3600).reason == "ResourceApiUnavailable"
    del world.kube.secret_versions[(NS, "creds")]  # the Secret deleted: nothing to bind to
    assert world.reconcile(keyCacheSeconds=3600).verdict is not Verdict.READY


def test_the_agent_process_is_made_non_dumpable():
    code = (
        "import ctypes, ctypes.util; from imageunlock.app.hardening import non_dumpable, PR_GET_DUMPABLE; "
        "assert non_dumpable(); libc = ctypes.CDLL(ctypes.util.find_library('c')); "
        "print(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "0"


# -- revocation: a kept key goes when what it was kept for goes, not at the end of its window --


def test_dropping_a_tag_overwrites_every_key_it_tags_and_only_those():
    cache = KeyCache(Clock())
    cache.used("a", KEY, ttl=3600, tags=("owner-1", "secret-x"))
    cache.used("b", KEY, ttl=3600, tags=("owner-2", "secret-x"))
    cache.used("c", KEY, ttl=3600, tags=("owner-3", "secret-y"))
    kept = {b: e.key for b, e in cache._entries.items()}
    assert cache.holds("secret-x") and cache.drop("secret-x") == 2
    assert kept["a"] == bytearray(32) and kept["b"] == bytearray(32)  # overwritten, as expiry does
    assert cache.get("c") == KEY and not cache.holds("secret-x")
    assert cache.drop("owner-3") == 1 and len(cache) == 0


def _kept_bytes(world) -> bytearray:
    [entry] = world.reconciler.key_cache._entries.values()
    return entry.key


def test_a_spec_edited_to_key_cache_seconds_0_drops_the_kept_key_at_once(world):
    """Not at the end of the old window (up to 30 days): the next step of the object."""
    assert world.reconcile(keyCacheSeconds=30 * 24 * 3600).verdict is Verdict.READY
    kept = _kept_bytes(world)
    world.reconcile(keyCacheSeconds=0)
    assert len(world.reconciler.key_cache) == 0 and kept == bytearray(len(kept))


def test_a_spec_that_no_longer_names_key_cache_seconds_drops_the_kept_key(world):
    assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
    world.kube.secret_versions[(NS, "creds")] = "rotated"  # and the credentials were rotated
    world.key = FakeKeyClient(FRAGMENT)
    world.runtime._images.clear()
    assert world.reconcile().verdict is Verdict.READY
    assert len(world.reconciler.key_cache) == 0


def test_a_rotated_or_deleted_secret_drops_the_keys_fetched_with_it(world):
    """The Secret watch's report (agent/handlers.py _secret_changed) revokes at once; a key
    fetched with another Secret stays."""
    assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
    kept = _kept_bytes(world)
    world.reconciler.key_cache.used("elsewhere", KEY, ttl=3600, tags=(("secret", NS, "other-creds"),))
    world.reconciler.secret_changed(NS, "creds")
    assert len(world.reconciler.key_cache) == 1 and kept == bytearray(len(kept))
    assert world.reconciler.key_cache.get("elsewhere") == KEY


def test_deleting_the_imageunlock_drops_its_kept_keys(world):
    assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
    kept = _kept_bytes(world)
    world.reconciler.release_keys(NS, "another-object", None)  # someone else's deletion: no effect
    assert len(world.reconciler.key_cache) == 1
    world.reconciler.release_keys(NS, NAME, None)
    assert len(world.reconciler.key_cache) == 0 and kept == bytearray(len(kept))


def test_a_spec_that_still_caches_keeps_its_key(world):
    assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
    world.reconciler.release_keys(NS, NAME, world.body(keyCacheSeconds=3600))
    assert len(world.reconciler.key_cache) == 1


def test_a_dumpable_agent_keeps_no_key_and_says_why_once(world, caplog):
    """Where the process could not be made non-dumpable (app/hardening.py), a kept key would be
    readable from a core dump or by any process of the agent's user: keyCacheSeconds is then
    refused — the key is fetched per unlock — and that is said once at WARNING."""
    world.reconciler.may_cache_keys = False
    with caplog.at_level(logging.WARNING, logger="imageunlock.agent.reconciler"):
        assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
        world.runtime._images.clear()
        assert world.reconcile(keyCacheSeconds=3600).verdict is Verdict.READY
    assert len(world.reconciler.key_cache) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "non-dumpable" in warnings[0]


def test_the_agent_caches_keys_only_when_hardening_succeeded(monkeypatch):
    from imageunlock.app import hardening

    monkeypatch.setattr(hardening.sys, "platform", "darwin")
    assert hardening.non_dumpable() is False and hardening.protected() is False
