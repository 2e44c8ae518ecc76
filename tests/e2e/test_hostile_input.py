"""Hostile input, refused before it can do harm: archive paths that leave the allowed roots
or are no regular file, oversized or malformed Secrets (nothing read, no login), and archives
made with the right key that try to move tags they were not asked for or break the parser or
the Engine (issue 8, items 3 and 7: Stalled, never retried)."""

from __future__ import annotations

import os
import stat
import time

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH
from imageunlock.errors import ARCHIVE_ERROR_MESSAGE

from ..support import audit, tamper
from ..support.cluster import AGENT_USER, spec_for, stalled_with
from ..support.dockerd import loaded
from ..support.operator_process import place
from ..support.resource_api import TEST_EMAIL
from ..support.wait import wait_for

pytestmark = pytest.mark.e2e


def test_hostile_archive_paths_are_refused_before_any_read(
    cluster, namespace, secret, start_operator, archives, archive_root, tmp_path, resource_api
):
    outside = tmp_path / "outside.enc"
    outside.write_bytes(archives.openssl_archive.read_bytes())
    (archive_root / "escape.enc").symlink_to(outside)
    (archive_root / "adir").mkdir()
    os.mknod(archive_root / "device", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # like /dev/zero
    cases = {
        "dotdot": (str(archive_root / ".." / "outside.enc"), "outside the allowed archive roots"),
        "symlink": (str(archive_root / "escape.enc"), "outside the allowed archive roots"),
        "device": (str(archive_root / "device"), "not a regular file"),
        "directory": (str(archive_root / "adir"), "is a directory"),
    }
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    for name, (path, _) in cases.items():
        cluster.create_unlock(namespace, name, spec_for(path, archives.version, secret))
    for name, (_, expected) in cases.items():
        assert expected in stalled_with(cluster, namespace, name, "InvalidConfiguration"), name
    assert resource_api.calls[LOGIN_PATH] == 0 and resource_api.calls[KEY_FRAGMENT_PATH] == 0


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"email": TEST_EMAIL, "password": "x" * 5000}, "larger than 4096 bytes"),
        ({"email": TEST_EMAIL}, "lacks key(s) password"),
        ({"email": TEST_EMAIL, "password": "\n"}, "is empty"),
    ],
)
def test_oversized_or_malformed_secret_is_a_clear_error(
    cluster, namespace, start_operator, archives, archive_root, resource_api, data, expected
):
    cluster.core.create_namespaced_secret(namespace, {"metadata": {"name": "odd"}, "stringData": data})
    start_operator()
    cluster.create_unlock(
        namespace, "odd", spec_for(place(archives.openssl_archive, archive_root), archives.version, "odd")
    )
    assert expected in stalled_with(cluster, namespace, "odd", "InvalidConfiguration")
    assert resource_api.calls[LOGIN_PATH] == 0


def test_archive_cannot_move_tags_it_was_not_asked_for(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api, tmp_path
):
    """Item 3: every RepoTag in manifest.json was applied, so an archive made with the right key
    could overwrite another team's image."""
    victim = "victim/app:prod"
    clean_docker.docker("load", "-i", str(archives.plaintext))
    clean_docker.docker("tag", archives.refs[1], victim)
    for ref in archives.refs:
        clean_docker.docker("rmi", ref)
    before = loaded(clean_docker)
    assert list(before) == [victim]
    archive = tamper.rewrite(
        archives.plaintext, tmp_path / "foreign.enc", archives.fragment, tamper.add_tags([victim, "nginx:latest"])
    )
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="3600")
    cluster.create_unlock(namespace, "foreign", spec_for(place(archive, archive_root), archives.version, secret))
    message = stalled_with(cluster, namespace, "foreign", "ArchiveHasForeignTags")
    assert victim in message
    assert loaded(clean_docker) == before, "nothing loaded, the victim's tag unmoved"
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1


@pytest.mark.parametrize(
    "edit, reason, text",
    [
        (tamper.nested_manifest(), "ArchiveInvalid", ARCHIVE_ERROR_MESSAGE),
        (tamper.layer_not_a_tar, "ArchiveRejected", "rebuild it"),
    ],
    ids=["deeply-nested-manifest", "layer-not-a-tar"],
)
def test_archive_content_failures_stall_instead_of_retrying(
    cluster, namespace, secret, start_operator, archives, archive_root, resource_api, tmp_path, edit, reason, text
):
    """Item 7: a RecursionError from a deeply nested manifest.json, and the Engine refusing a
    layer, were transient: login + key + full upload every backoff, forever."""
    archive = tamper.rewrite(archives.plaintext, tmp_path / "hostile.enc", archives.fragment, edit)
    start_operator(IMAGEUNLOCK_VERIFY_INTERVAL="1")
    cluster.create_unlock(namespace, "content", spec_for(place(archive, archive_root), archives.version, secret))
    assert text in stalled_with(cluster, namespace, "content", reason, timeout=90)
    # Stalled on unchanged inputs: the re-verification loop (every second here) must not try
    # again. Each pass it makes over a Stalled object first reads the object's Secret (did the
    # credentials change? resync.py), so three such reads in the API server's audit log after
    # the stall are three passes that looked and did not retry.
    if cluster.audit_log is None:  # a cluster given by IMAGEUNLOCK_TEST_KUBECONFIG: no audit log
        time.sleep(3)  # then three verify intervals are the bounded window
    else:
        since = audit.end(cluster.audit_log)

        def passes() -> int:
            return audit.reads(audit.entries(cluster.audit_log, AGENT_USER, since), "secrets", namespace, secret)

        wait_for(
            lambda: passes() >= 3, 30, "three passes of the re-verification loop over the Stalled object", interval=0.5
        )
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1 and resource_api.calls[LOGIN_PATH] == 1
