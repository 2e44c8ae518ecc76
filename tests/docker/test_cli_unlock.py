"""``imageunlock unlock`` end to end: real dockerd, real loopback resource API, real archives."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH
from imageunlock.errors import ARCHIVE_ERROR_MESSAGE

from ..support.broken import broken_archives
from ..support.cli import CREDENTIALS_ENV, error_lines, run_cli
from ..support.dockerd import Dockerd, loaded
from ..support.images import ArchiveSet
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi

pytestmark = pytest.mark.docker


def unlock(archive: Path, archives: ArchiveSet, api: FakeResourceApi, engine: Dockerd, *extra: str, env=None):
    return run_cli(
        "unlock",
        "--archive",
        str(archive),
        "--version",
        archives.version,
        "--api-url",
        api.url,
        "--docker-host",
        engine.url,
        *extra,
        env={**CREDENTIALS_ENV, **(env or {})},
    )


@pytest.mark.parametrize("which", ["openssl_archive", "own_archive"])
def test_unlocks_seven_images_then_fast_path_makes_no_key_request(
    clean_docker, archives, resource_api, which, tmp_path
):
    state = {"XDG_STATE_HOME": str(tmp_path)}  # where the first run records the verified IDs
    first = unlock(getattr(archives, which), archives, resource_api, clean_docker, env=state)
    assert first.returncode == 0, first.stderr
    assert loaded(clean_docker) == archives.ids  # every tag, with the image ID of its config
    assert "Loading" in first.stderr and "100%" in first.stderr
    assert resource_api.calls == {LOGIN_PATH: 1, KEY_FRAGMENT_PATH: 1}

    resource_api.reset()
    second = unlock(getattr(archives, which), archives, resource_api, clean_docker, env=state)
    assert second.returncode == 0, second.stderr
    assert "already present" in second.stderr
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 0 and resource_api.calls[LOGIN_PATH] == 0


def test_wrong_credentials_fail_with_one_actionable_line(clean_docker, archives, resource_api):
    result = unlock(
        archives.openssl_archive, archives, resource_api, clean_docker, env={"IMAGEUNLOCK_PASSWORD": "not-the-password"}
    )
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "rejected the credentials" in line and "not-the-password" not in result.stderr
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 0
    assert loaded(clean_docker) == {}


def test_missing_credentials_are_explained(clean_docker, archives, resource_api):
    result = run_cli(
        "unlock",
        "--archive",
        str(archives.openssl_archive),
        "--version",
        archives.version,
        "--api-url",
        resource_api.url,
        "--docker-host",
        clean_docker.url,
    )
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "IMAGEUNLOCK_EMAIL" in line


def test_three_5xx_then_success(clean_docker, archives, resource_api):
    resource_api.fail(KEY_FRAGMENT_PATH, 502, times=3)
    result = unlock(archives.openssl_archive, archives, resource_api, clean_docker)
    assert result.returncode == 0, result.stderr
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 4
    assert loaded(clean_docker) == archives.ids


def test_every_broken_archive_fails_the_same_way_and_loads_nothing(clean_docker, archives, tmp_path):
    workdir = tmp_path / "archives"
    workdir.mkdir()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    lines = set()
    for name, path in broken_archives(archives, workdir).items():
        fragment = b"some other fragment" if name == "wrong key" else archives.fragment
        before = sorted(os.listdir(workdir))
        with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, fragment) as api:
            result = unlock(path, archives, api, clean_docker, env={"TMPDIR": str(scratch)})
        assert result.returncode == 1, (name, result.stderr)
        [line] = error_lines(result.stderr)
        lines.add(line)
        assert loaded(clean_docker) == {}, f"{name}: something was loaded"
        assert sorted(os.listdir(workdir)) == before and os.listdir(scratch) == [], f"{name}: left files"
    assert lines == {f"imageunlock: error: {ARCHIVE_ERROR_MESSAGE}"}


def test_missing_archive_names_the_absent_images(clean_docker, archives, resource_api, tmp_path):
    result = unlock(tmp_path / "nope.enc", archives, resource_api, clean_docker)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "does not exist" in line and f"azaion/flights:{archives.version}" in line
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 0


def test_image_absent_from_the_archive_is_named_and_nothing_loads(clean_docker, archives, resource_api):
    images = [arg for name in [*archives.names, "azaion/extra-service"] for arg in ("--image", name)]
    result = unlock(archives.openssl_archive, archives, resource_api, clean_docker, *images)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert f"archive does not contain azaion/extra-service:{archives.version}" in line
    assert loaded(clean_docker) == {}


def test_unreachable_engine_is_a_transient_failure(archives, resource_api, tmp_path):
    engine = Dockerd(tmp_path)  # never started: its socket does not exist
    result = unlock(archives.openssl_archive, archives, resource_api, engine)
    assert result.returncode == 75
    [line] = error_lines(result.stderr)
    assert "not reachable" in line


def test_default_images_and_env_defaults(clean_docker, archives, resource_api, tmp_path):
    archive = tmp_path / "images.enc"
    shutil.copy(archives.own_archive, archive)
    result = run_cli(
        "unlock",
        "--docker-host",
        clean_docker.url,
        env={
            **CREDENTIALS_ENV,
            "IMAGES_PATH": str(archive),
            "API_VERSION": archives.version,
            "RESOURCE_API_URL": resource_api.url,
        },
    )
    assert result.returncode == 0, result.stderr
    assert set(loaded(clean_docker)) == set(archives.refs)


def test_output_json_reports_the_outcome_on_stdout_for_scripts(clean_docker, archives, resource_api, tmp_path):
    state = {"XDG_STATE_HOME": str(tmp_path)}
    first = unlock(archives.openssl_archive, archives, resource_api, clean_docker, "--output", "json", env=state)
    assert first.returncode == 0, first.stderr
    outcome = json.loads(first.stdout)  # stdout holds this one document and nothing else
    assert outcome == {
        "ready": True,
        "fastPath": False,
        "version": archives.version,
        "images": [{"name": ref, "id": archives.ids[ref]} for ref in archives.refs],
        "archiveBytes": archives.openssl_archive.stat().st_size,
    }
    assert loaded(clean_docker) == archives.ids
    assert "imageunlock: Loading: 100% of" in first.stderr  # not a terminal: the plain lines as before

    second = unlock(archives.openssl_archive, archives, resource_api, clean_docker, "--output", "json", env=state)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["fastPath"] is True

    failed = unlock(
        archives.openssl_archive,
        archives,
        resource_api,
        clean_docker,
        "--output",
        "json",
        env={"IMAGEUNLOCK_PASSWORD": "not-the-password"},
    )
    assert failed.returncode == 1
    error = json.loads(failed.stdout)["error"]
    assert error["reason"] == "AuthenticationFailed" and error["transient"] is False
    assert error_lines(failed.stderr) == [f"imageunlock: error: {error['message']}"]
