"""Faults, each proven to end in the state a user expects, on the real API server, dockerd
and loopback resource API: the resource API failing, hanging or refusing (retried to Ready,
or Stalled without a hot loop), credentials wrong or missing, archives damaged or not what the
spec says, dockerd down, and the operator killed in the middle of a load."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH
from imageunlock.errors import ARCHIVE_ERROR_MESSAGE

from ..support.broken import broken_archives
from ..support.cluster import is_ready, is_stalled, on_node, spec_for, stalled_with
from ..support.dockerd import Dockerd, load_events, loaded
from ..support.images import build_archive_set
from ..support.operator_process import place
from ..support.resource_api import TEST_EMAIL
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e


def test_bad_credentials_stall_without_a_hot_loop(
    cluster, namespace, start_operator, archives, archive_root, clean_docker, resource_api
):
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "wrong"}, "stringData": {"email": TEST_EMAIL, "password": "not-it"}}
    )
    path = place(archives.openssl_archive, archive_root)
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    cluster.create_unlock(namespace, "creds", spec_for(path, archives.version, "wrong"))
    wait_for(lambda: is_stalled(cluster, namespace, "creds"), 60, "Stalled")
    stalled = cluster.condition(namespace, "creds", "Stalled")
    assert stalled["reason"] == "AuthenticationFailed" and "credentials" in stalled["message"]
    assert cluster.status(namespace, "creds")["phase"] == "Failed"
    assert cluster.condition(namespace, "creds", "Ready")["status"] == "False"
    logins = resource_api.calls[LOGIN_PATH]
    wait_for(
        lambda: any(
            e.type == "Warning" and e.reason == "AuthenticationFailed" for e in cluster.events(namespace, "creds")
        ),
        10,
        "a Warning event",
    )
    assert resource_api.calls[LOGIN_PATH] == logins == 1, "a permanent error must not be retried"
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 0 and loaded(clean_docker) == {}


def test_missing_secret_stalls_with_an_actionable_message(cluster, namespace, start_operator, archives, archive_root):
    path = place(archives.openssl_archive, archive_root)
    start_operator()
    cluster.create_unlock(namespace, "nosecret", spec_for(path, archives.version, "does-not-exist"))
    wait_for(lambda: is_stalled(cluster, namespace, "nosecret"), 60, "Stalled")
    message = cluster.condition(namespace, "nosecret", "Stalled")["message"]
    assert "does-not-exist" in message and "not found" in message


def test_resource_api_5xx_is_retried_until_ready(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    resource_api.fail(LOGIN_PATH, 503, times=3)
    path = place(archives.openssl_archive, archive_root)
    start_operator()
    cluster.create_unlock(namespace, "flaky", spec_for(path, archives.version, secret))
    wait_for(lambda: is_ready(cluster, namespace, "flaky"), 90, "Ready after retries")
    assert resource_api.calls[LOGIN_PATH] == 4 and resource_api.calls[KEY_FRAGMENT_PATH] == 1
    warnings = [e for e in cluster.events(namespace, "flaky") if e.type == "Warning"]
    assert [(e.count, "503" in e.message) for e in warnings] == [(3, True)], warnings  # one, aggregated
    assert loaded(clean_docker) == archives.ids


def test_api_500_three_times_then_ready_with_exactly_one_load(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    since = time.time()
    resource_api.fail(KEY_FRAGMENT_PATH, 500, times=3)
    start_operator()
    cluster.create_unlock(
        namespace, "once", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "once"), 90, "Ready")
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 4
    assert load_events(clean_docker, since) == len(archives.refs)  # one load of each image


@pytest.mark.parametrize(
    "status, reason, key_requests", [(401, "AuthenticationFailed", 2), (403, "ResourceApiRejected", 1)]
)
def test_key_refused_relogs_in_once_then_stalls(
    cluster,
    namespace,
    secret,
    start_operator,
    archives,
    archive_root,
    clean_docker,
    resource_api,
    status,
    reason,
    key_requests,
):
    resource_api.fail(KEY_FRAGMENT_PATH, status, times=10)
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    cluster.create_unlock(
        namespace, "refused", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    stalled_with(cluster, namespace, "refused", reason)
    assert resource_api.calls[KEY_FRAGMENT_PATH] == key_requests <= 2
    assert loaded(clean_docker) == {}


def test_hanging_api_is_bounded_by_timeouts_and_retried(
    cluster, namespace, secret, start_operator, archives, archive_root, resource_api
):
    resource_api.delay = 3.0  # every attempt times out until the test lifts it
    start_operator(IMAGEUNLOCK_API_READ_TIMEOUT="0.5", IMAGEUNLOCK_API_CONNECT_TIMEOUT="0.5")
    cluster.create_unlock(
        namespace, "slow", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    # any retry from the second on (each shows it until its attempt starts): not one moment
    status = wait_for(lambda: retrying(cluster.status(namespace, "slow"), since_attempt=2), 60, "a retry after 2")
    assert condition(status, "Reconciling")["reason"] == "ResourceApiUnavailable"
    resource_api.delay = 0
    wait_for(lambda: is_ready(cluster, namespace, "slow"), 60, "Ready once the API answers")


def test_transient_failure_during_reverification_is_retried_to_ready(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    """Item 5: a transient failure during re-verification left a working phase, and the loop
    then skipped the resource forever (no API call, no write, the image stayed absent)."""
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="1", IMAGEUNLOCK_RETRY_BASE="1", IMAGEUNLOCK_RETRY_MAX="2")
    cluster.create_unlock(
        namespace, "heal", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    wait_for(lambda: is_ready(cluster, namespace, "heal"), 60, "Ready")
    resource_api.fail_until_stopped(KEY_FRAGMENT_PATH, 503)  # until the retrying status was seen
    clean_docker.docker("rmi", archives.refs[2])
    wait_for(lambda: retrying(cluster.status(namespace, "heal")), 30, "a truthful retrying status")
    resource_api.stop_failing(KEY_FRAGMENT_PATH)
    wait_for(
        lambda: is_ready(cluster, namespace, "heal") and loaded(clean_docker) == archives.ids,
        60,
        "Ready again with the image back",
    )
    # the first unlock, each 503 retried once, then the one success
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1 + resource_api.faulted[KEY_FRAGMENT_PATH] + 1


def retrying(status: dict, since_attempt: int = 1) -> dict | None:
    """``status`` when it reports a retry after attempt ``since_attempt`` or a later one
    ("attempt N failed: ...; retrying in Ns")."""
    found = re.search(r"attempt (\d+) failed: .*retrying in", status.get("message", ""))
    return status if found and int(found.group(1)) >= since_attempt else None


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status.get("conditions") or [] if c["type"] == type_)


def test_broken_archives_all_stall_with_one_message_and_load_nothing(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api, tmp_path
):
    """Wrong fragment, bad padding, a flipped byte in the IV, the middle and the last block,
    truncation, and plaintext that is not an image tar."""
    workdir = tmp_path / "broken"
    workdir.mkdir()
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    names = {}
    for i, (case, path) in enumerate(broken_archives(archives, workdir).items()):
        if case == "wrong key":
            continue  # below, with its own API
        names[case] = f"broken-{i}"
        cluster.create_unlock(
            namespace, names[case], spec_for(place(path, archive_root, f"{i}.enc"), archives.version, secret)
        )
    messages = {case: stalled_with(cluster, namespace, name, "ArchiveInvalid", 90) for case, name in names.items()}
    assert set(messages.values()) == {on_node(ARCHIVE_ERROR_MESSAGE)}, messages
    assert loaded(clean_docker) == {}


def test_wrong_fragment_stalls_and_loads_nothing(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    resource_api.fragment = b"not the fragment this archive was made with"
    start_operator()
    cluster.create_unlock(
        namespace, "wrongkey", spec_for(place(archives.openssl_archive, archive_root), archives.version, secret)
    )
    assert stalled_with(cluster, namespace, "wrongkey", "ArchiveInvalid") == on_node(ARCHIVE_ERROR_MESSAGE)
    assert loaded(clean_docker) == {}


@pytest.fixture(scope="session")
def six_archives(dockerd, archives, tmp_path_factory):
    """An archive holding 6 of the 7 default services."""
    return build_archive_set(
        dockerd,
        tmp_path_factory.mktemp("six"),
        archives.names[:6],
        archives.version,
        fragment=archives.fragment,
        payload_bytes=16 * 1024,
    )


def test_six_of_seven_images_names_the_missing_one(
    cluster, namespace, secret, start_operator, six_archives, archive_root, clean_docker, resource_api
):
    start_operator()
    cluster.create_unlock(
        namespace, "six", spec_for(place(six_archives.openssl_archive, archive_root), six_archives.version, secret)
    )
    message = stalled_with(cluster, namespace, "six", "ImagesNotInArchive")
    assert f"azaion/ai-training:{six_archives.version}" in message
    assert "azaion/flights" not in message
    assert loaded(clean_docker) == {}


def test_digest_mismatch_stalls_before_any_key_request(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api
):
    start_operator()
    path = place(archives.openssl_archive, archive_root)
    cluster.create_unlock(namespace, "digest", spec_for(path, archives.version, secret, archiveSha256="ab" * 32))
    message = stalled_with(cluster, namespace, "digest", "ArchiveDigestMismatch")
    actual = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    # the expected digest is named; the file's actual one is not shown (review: a hash leak)
    assert "ab" * 32 in message and actual not in message
    # checked once the resource API accepted the credentials (no verdict for anyone without
    # them: issue 18), and before the key is requested or anything loads
    assert resource_api.calls[LOGIN_PATH] == 1 and resource_api.calls[KEY_FRAGMENT_PATH] == 0
    assert loaded(clean_docker) == {}
    # the right digest unlocks
    cluster.patch_spec(namespace, "digest", {"archiveSha256": actual})
    wait_for(lambda: is_ready(cluster, namespace, "digest"), 60, "Ready with the right digest")


def test_dockerd_stopped_then_restarted_ends_ready(
    cluster, namespace, secret, start_operator, archives, archive_root, resource_api, tmp_path
):
    engine = Dockerd(tmp_path / "own-dockerd").start()
    try:
        engine.stop()
        start_operator(IMAGEUNLOCK_DOCKER_HOST=engine.url)
        cluster.create_unlock(
            namespace, "engine", spec_for(place(archives.own_archive, archive_root), archives.version, secret)
        )
        wait_for(
            lambda: cluster.condition(namespace, "engine", "Reconciling").get("reason") == "RuntimeUnavailable",
            60,
            "RuntimeUnavailable while dockerd is down",
        )
        assert not is_stalled(cluster, namespace, "engine")
        engine.start()
        wait_for(lambda: is_ready(cluster, namespace, "engine"), 60, "Ready after dockerd is back")
        assert loaded(engine) == archives.ids
    finally:
        engine.stop()


def test_operator_killed_mid_load_recovers_cleanly(
    cluster, namespace, secret, start_operator, big_archives, archive_root, clean_docker, resource_api
):
    path = place(big_archives.openssl_archive, archive_root)
    before = sorted(os.listdir(archive_root))
    operator = start_operator(IMAGEUNLOCK_PROGRESS_INTERVAL="0.05")
    # The moment is gated, not caught by polling (a fast machine finished the load between
    # two polls): the key answer waits until the Engine is paused, so the load starts and
    # stalls in its first megabytes; the operator is killed there.
    key_sent = resource_api.hold(KEY_FRAGMENT_PATH)
    engine = clean_docker.proc
    assert engine is not None
    try:
        cluster.create_unlock(namespace, "big", spec_for(path, big_archives.version, secret, images=big_archives.names))
        wait_for(lambda: resource_api.calls[KEY_FRAGMENT_PATH] > 0, 60, "the key request")
        engine.send_signal(signal.SIGSTOP)
        key_sent.set()
        # Loading: the key arrived and the stream started; it cannot end while the Engine is paused
        wait_for(lambda: cluster.status(namespace, "big").get("phase") == "Loading", 60, "mid-load")
        operator.stop(signal.SIGKILL)
    finally:
        key_sent.set()
        engine.send_signal(signal.SIGCONT)
    assert sorted(os.listdir(archive_root)) == before
    assert unlock_leftovers(operator.tmpdir) == []
    restarted = start_operator()
    wait_for(lambda: is_ready(cluster, namespace, "big"), 120, "Ready after restart")
    assert loaded(clean_docker) == big_archives.ids  # each image once, nothing half-loaded
    dangling = clean_docker.docker("images", "-a", "-q", "--filter", "dangling=true", text=True).stdout.split()
    assert dangling == []
    assert unlock_leftovers(restarted.tmpdir) == []


def unlock_leftovers(tmpdir) -> list[str]:
    """Files in the operator's TMPDIR other than the kubernetes client's copies of the
    kubeconfig's inline certificates (it removes those at exit, which SIGKILL skips; an
    in-cluster operator has none). The unlock itself must never write a file."""
    return [name for name in os.listdir(tmpdir) if not (tmpdir / name).read_bytes().startswith(b"-----BEGIN ")]
