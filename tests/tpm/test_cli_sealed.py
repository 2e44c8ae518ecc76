"""``imageunlock unlock --key-sealing tpm`` on a Docker Compose device: the real console
script, a real TPM 2.0 (swtpm), the private dockerd and the loopback resource API (issue 23).

What must hold: the first unlock asks the API and keeps only a sealed blob beside the state
file; with the API gone and the images removed, the next unlock loads them from the sealed
key; another TPM refuses the blob and the command waits for the API (exit 75, one clear line),
then reseals once the API is back; the blob copied off the disk holds no key and decrypts
nothing; no key bytes in the state directory or in anything the command printed."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest

from imageunlock.engine import crypto
from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH
from imageunlock.engine.keys.sealed import SEALED_DIR
from imageunlock.errors import ArchiveError

from ..support.cli import CREDENTIALS_ENV, error_lines, run_cli
from ..support.dockerd import Dockerd, loaded, remove_images
from ..support.images import ArchiveSet
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD, FakeResourceApi
from ..support.tpm import Swtpm

pytestmark = [pytest.mark.tpm, pytest.mark.docker]

EX_TEMPFAIL = 75


def unlock(archives: ArchiveSet, api_url: str, engine: Dockerd, tpm: Swtpm, state: Path):
    return run_cli(
        "unlock",
        "--archive",
        str(archives.own_archive),
        "--version",
        archives.version,
        "--api-url",
        api_url,
        "--docker-host",
        engine.url,
        "--key-sealing",
        "tpm",
        "--tpm-tcti",
        tpm.tcti,
        env={**CREDENTIALS_ENV, "XDG_STATE_HOME": str(state)},
    )


def spellings(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]


def holding(root: Path, secret: bytes) -> list[str]:
    return [
        str(p) for p in root.rglob("*") if p.is_file() and any(form in p.read_bytes() for form in spellings(secret))
    ]


def sealed_blobs(state: Path) -> list[Path]:
    directory = state / "imageunlock" / SEALED_DIR
    return sorted(directory.iterdir()) if directory.exists() else []


def test_unlocks_again_from_the_sealed_key_with_the_api_gone(
    clean_docker: Dockerd, archives: ArchiveSet, swtpm: Swtpm, tmp_path: Path
) -> None:
    key = crypto.derive_key(archives.fragment)
    api = FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment).start()
    url = api.url
    try:
        first = unlock(archives, url, clean_docker, swtpm, tmp_path)
        assert first.returncode == 0, first.stderr
        assert api.calls == {LOGIN_PATH: 1, KEY_FRAGMENT_PATH: 1}
    finally:
        api.stop()
    [blob] = sealed_blobs(tmp_path)
    assert blob.stat().st_mode & 0o777 == 0o600
    assert holding(tmp_path, key) == [] and holding(tmp_path, archives.fragment) == []

    remove_images(clean_docker)  # a repair, with no resource API
    again = unlock(archives, url, clean_docker, swtpm, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "from this device's TPM" in again.stderr
    assert loaded(clean_docker) == archives.ids
    assert sealed_blobs(tmp_path) == [blob]
    for output in (first.stdout + first.stderr, again.stdout + again.stderr):
        assert not any(form.decode("latin-1") in output for form in spellings(key))

    # The blob copied off the disk: no 32 bytes of it (nor its hash) open the archive.
    data = blob.read_bytes()
    archive = archives.own_archive.read_bytes()[: 64 * 1024]
    start = archives.plaintext.read_bytes()[:512]
    real = next(iter(crypto.decrypt_with_key(io.BytesIO(archive), key, chunk_size=4096)))
    assert real.startswith(start)  # what the real key gives
    for candidate in [data[i : i + 32] for i in range(len(data) - 31)] + [crypto.derive_key(data)]:
        try:
            got = next(iter(crypto.decrypt_with_key(io.BytesIO(archive), candidate, chunk_size=4096)))
        except (ArchiveError, StopIteration):
            continue
        assert not got.startswith(start[:16]), "a piece of the sealed blob decrypts the archive"


def test_another_tpm_refuses_and_waits_for_the_api_then_reseals(
    clean_docker: Dockerd, archives: ArchiveSet, swtpm: Swtpm, other_swtpm: Swtpm, tmp_path: Path
) -> None:
    with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as api:
        url = api.url
        first = unlock(archives, url, clean_docker, swtpm, tmp_path)
        assert first.returncode == 0, first.stderr
    [blob] = sealed_blobs(tmp_path)
    sealed_by_first = blob.read_bytes()

    remove_images(clean_docker)
    refused = unlock(archives, url, clean_docker, other_swtpm, tmp_path)  # the disk in another device
    assert refused.returncode == EX_TEMPFAIL, refused.stderr
    [line] = error_lines(refused.stderr)
    assert "sealed to this node's TPM was not used (OtherTpm" in line
    assert "resource API" in line
    assert loaded(clean_docker) == {}

    with FakeResourceApi(TEST_EMAIL, TEST_PASSWORD, archives.fragment) as api:
        back = unlock(archives, api.url, clean_docker, other_swtpm, tmp_path)
        assert back.returncode == 0, back.stderr
        assert api.calls[KEY_FRAGMENT_PATH] == 1
    # resealed, to the other TPM (a new API URL is another key source: its own slot)
    assert loaded(clean_docker) == archives.ids
    assert any(p.read_bytes() != sealed_by_first for p in sealed_blobs(tmp_path))
